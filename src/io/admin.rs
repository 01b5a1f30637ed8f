//! The admin listener (where `--metrics` binds): reads one request per connection,
//! asks `core::admin` what it is, answers from the proxy's state, and closes.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::state::Shared;
use crate::core::admin::{parse_request, route, Response, Route, MAX_BODY, MAX_HEAD};

/// A client that sends nothing for this long is answered 408 and dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more wait for a slot (a scraper and a probe or
/// two are the normal load).
const MAX_CLIENTS: usize = 16;

/// Sets a log filter: the filter in use after, or why it was refused.
pub type SetFilter = Box<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// Reads and changes the log filter at run time.
pub struct LogControl {
    /// The filter in use.
    pub get: Box<dyn Fn() -> String + Send + Sync>,
    /// Sets a filter: the one in use after, or why it was refused.
    pub set: SetFilter,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl").finish_non_exhaustive()
    }
}

/// What the admin surface answers from.
#[derive(Debug)]
pub struct Admin {
    /// Renders the Prometheus exposition.
    pub metrics: PrometheusHandle,
    /// The proxy's state (readiness, the state dump).
    pub shared: Arc<Shared>,
    /// The log filter, if it can be changed.
    pub log: Option<LogControl>,
}

/// Serves the admin surface on `listener` until dropped.
pub async fn serve_admin(listener: TcpListener, admin: Arc<Admin>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &admin).await {
                tracing::debug!(error = %e, "admin connection");
            }
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, admin: &Admin) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let response = loop {
        let mut chunk = [0u8; 2048];
        let n = match tokio::time::timeout(READ_TIMEOUT, stream.read(&mut chunk)).await {
            Ok(r) => r?,
            Err(_) => break Response::text(408, "request timeout\n"),
        };
        if n == 0 {
            return Ok(()); // Closed before a whole request: nothing to answer.
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_request(&buf) {
            Ok(None) if buf.len() <= MAX_HEAD + MAX_BODY + 4 => continue,
            Ok(None) => break Response::text(413, "request too large\n"),
            Ok(Some(req)) => {
                let response = respond(&route(&req), admin);
                tracing::debug!(method = %req.method, path = %req.path, status = response.status, "admin request");
                break response;
            }
            Err(e) => break Response::text(e.status(), format!("{e}\n")),
        }
    };
    stream.write_all(&response.encode()).await?;
    stream.shutdown().await
}

fn respond(route: &Route, admin: &Admin) -> Response {
    match route {
        Route::Metrics => {
            admin.shared.update_live_gauges();
            Response {
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                ..Response::text(200, admin.metrics.render())
            }
        }
        Route::Live => Response::text(200, "live\n"),
        Route::Ready => {
            if admin.shared.is_ready() {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, "not ready\n")
            }
        }
        Route::State => {
            let state = admin.shared.debug_state();
            Response::json(
                200,
                serde_json::to_string_pretty(&state).unwrap_or_default() + "\n",
            )
        }
        Route::LogLevel => match &admin.log {
            Some(log) => Response::text(200, (log.get)() + "\n"),
            None => Response::text(404, "the log level cannot be changed in this process\n"),
        },
        Route::SetLogLevel(filter) => match &admin.log {
            Some(log) => match (log.set)(filter) {
                Ok(now) => {
                    tracing::info!(filter = %now, "log filter changed");
                    Response::text(200, now + "\n")
                }
                Err(e) => Response::text(400, format!("invalid log filter: {e}\n")),
            },
            None => Response::text(404, "the log level cannot be changed in this process\n"),
        },
        Route::NotFound | Route::MethodNotAllowed(_) | Route::BadBody => {
            Response::for_route(route).unwrap_or_else(|| Response::text(404, "not found\n"))
        }
    }
}
