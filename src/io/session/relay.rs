//! A plain relayed session: both directions pumped until either side ends (same host,
//! a direct hop without scheduling, or a tunnel that is not sliced).

use std::sync::Arc;

use super::pump::{pump, End, PumpEnd, Sides};
use crate::io::error::report;
use crate::io::state::{SessionInfo, Shared};

/// Relays until either side ends. `app` is the side the session's DEALER is on
/// (the captured app, or the tunnel from its proxy); `far` is the ROUTER's side.
/// `labels`: direction labels for (app -> far, far -> app); `sides`: who is at the
/// other end of `app` and of `far`.
pub(crate) async fn relay(
    shared: Arc<Shared>,
    info: SessionInfo,
    app: End,
    far: End,
    labels: (&'static str, &'static str),
    sides: Sides,
    count_losses: bool,
) {
    let (app_rd, app_wr) = app.stream.into_split();
    let (far_rd, far_wr) = far.stream.into_split();
    let to_far = pump(
        app_rd,
        app.dec,
        far_wr,
        labels.0,
        Some((&shared, &info)),
        sides,
        shared.body_mover(),
    );
    let to_app = pump(
        far_rd,
        far.dec,
        app_wr,
        labels.1,
        None,
        sides.back(),
        shared.body_mover(),
    );
    tokio::select! {
        end = to_far => match end {
            PumpEnd::Closed => tracing::debug!(dst = %info.dst, "app closed its session"),
            PumpEnd::Failed(e) => report(&info, &e),
        },
        end = to_app => {
            if let PumpEnd::Failed(e) = &end {
                report(&info, e);
            }
            if count_losses {
                shared.upstream_died(&info, &end);
            }
        }
    }
    shared.session_ended(&info);
}
