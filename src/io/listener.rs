//! The listeners, shaped like mini-redis's server: `run(bound, shared, shutdown)`
//! accepts on every listener until shutdown, with a connection limit, and hands each
//! connection to its handler (captured, or from a peer proxy's tunnel).

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::captured::handle_captured;
use super::net::Bound;
use super::state::Shared;
use super::tunnel_in::handle_tunnel;

/// Accepts on every listener until `shutdown` completes.
pub async fn run(bound: Bound, shared: Arc<Shared>, shutdown: impl Future) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    let redirect = accept_loop(
        bound.redirect,
        shared.clone(),
        limit.clone(),
        Kind::Redirect,
    );
    let tunnel = async {
        match bound.tunnel {
            Some(l) => accept_loop(l, shared.clone(), limit.clone(), Kind::Tunnel).await,
            None => std::future::pending().await,
        }
    };
    let inbound = async {
        match bound.inbound {
            Some(l) => accept_loop(l, shared.clone(), limit.clone(), Kind::Inbound).await,
            None => std::future::pending().await,
        }
    };
    let memory = async {
        let mut tick = tokio::time::interval(super::memory::TICK);
        // A late tick must not look like a quiet one after a few microseconds.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            shared.update_live_gauges();
            if shared.egress.memory_return_due() || super::memory::blocks_idle() {
                let _ = tokio::task::spawn_blocking(super::memory::trim).await;
            }
        }
    };
    shared.set_ready(true);
    let redirect_check = async {
        super::redirect_check::watch(&shared.redirect).await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = redirect_check => {}
        _ = redirect => {}
        _ = tunnel => {}
        _ = inbound => {}
        _ = memory => {}
        _ = shutdown => tracing::info!("shutting down"),
    }
    shared.set_ready(false);
    shared.remove_inbound_rules();
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Captured from a local process (nat OUTPUT).
    Redirect,
    /// From a peer proxy.
    Tunnel,
    /// Captured from another host for a registered local node (nat PREROUTING).
    Inbound,
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    kind: Kind,
) {
    loop {
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            match kind {
                Kind::Redirect => handle_captured(shared, stream, peer, false).await,
                Kind::Inbound => handle_captured(shared, stream, peer, true).await,
                Kind::Tunnel => handle_tunnel(shared, stream, peer).await,
            }
            drop(permit);
        });
    }
}
