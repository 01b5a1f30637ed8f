//! The admin surface of a real proxy on loopback: readiness through its life, the
//! Prometheus exposition, the state dump's shape, the log level at run time, and the
//! answers to bad requests.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p3proxy::config::Config;
use p3proxy::io::{run, serve_admin, Admin, Bound, Env, LogControl, Shared};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sends `raw` and reads the whole answer: (status, headers and body).
async fn ask(admin: SocketAddr, raw: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answered")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, text)
}

async fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    ask(
        admin,
        format!("GET {path} HTTP/1.1\r\nhost: p3proxy\r\n\r\n").as_bytes(),
    )
    .await
}

fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[tokio::test]
async fn the_admin_surface_answers_what_an_operator_asks_and_refuses_the_rest() {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        tunnel: None,
        metrics: None,
        cluster_cidr: vec!["127.0.0.0/8".parse().unwrap()],
        journal: None,
        ..Config::default()
    };
    config.exempt = p3proxy::config::Exempt::by_uid(0);
    let bound = Bound::bind(&config).await.unwrap();
    let env = Env {
        orig_dst: Arc::new(|_| Err(std::io::Error::other("no redirect here"))),
        is_local: Arc::new(|_| true),
        is_listening: Arc::new(|_| true),
        is_loopback: Arc::new(|ip| ip.is_loopback()),
    };
    let shared = Shared::new(config, env, &bound).unwrap();
    let metrics = p3proxy::metrics::install().expect("the only recorder of this test binary");
    let filter = Arc::new(Mutex::new("info".to_string()));
    let (f1, f2) = (filter.clone(), filter.clone());
    let log = LogControl {
        get: Box::new(move || f1.lock().unwrap().clone()),
        set: Box::new(move |text| {
            if text.contains('[') {
                return Err(format!("cannot parse {text:?}"));
            }
            *f2.lock().unwrap() = text.to_string();
            Ok(text.to_string())
        }),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    tokio::spawn(serve_admin(
        listener,
        Arc::new(Admin {
            metrics,
            shared: shared.clone(),
            log: Some(log),
        }),
    ));

    // Not serving yet: not ready, but alive.
    let (status, text) = get(admin, "/ready").await;
    assert_eq!(status, 503, "{text}");
    assert_eq!(get(admin, "/live").await.0, 200);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn(run(bound, shared.clone(), stopped));
    for _ in 0..100 {
        if shared.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, text) = get(admin, "/ready").await;
    assert_eq!((status, body(&text)), (200, "ready\n"), "{text}");

    let (status, text) = get(admin, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("content-type: text/plain; version=0.0.4"),
        "{text}"
    );
    for series in [
        "\np3proxy_oldest_request_age_seconds 0\n",
        "\np3proxy_requests_unanswered 0\n",
        "# HELP p3proxy_oldest_request_age_seconds ",
    ] {
        assert!(text.contains(series), "{series}:\n{text}");
    }

    let (status, text) = get(admin, "/debug/state").await;
    assert_eq!(status, 200, "{text}");
    let state: serde_json::Value = serde_json::from_str(body(&text)).expect("JSON");
    assert_eq!(state["ready"], true);
    // Exempted by uid: the redirect cannot be probed, so readiness does not wait for it.
    assert_eq!(state["redirect"]["probe"], serde_json::Value::Null);
    assert_eq!(state["redirect"]["verified"], serde_json::Value::Null);
    assert_eq!(state["nodes"], serde_json::json!([]));
    assert_eq!(state["priority"]["configured"], "learned");
    assert_eq!(state["priority"]["in_use"], "key");
    assert!(state["priority"]["learned_order"].is_array());
    assert!(state["split_servers"].is_array());
    assert!(state["sessions_by_route"].is_object());
    assert_eq!(state["requests"]["unanswered"], 0);
    assert_eq!(state["requests"]["held_for_order"], 0);
    assert!(state["requests"]["oldest_age_s"].is_null());
    assert!(state["job"]["iteration_s"].is_null());

    // The log level at run time.
    let (status, text) = get(admin, "/log-level").await;
    assert_eq!((status, body(&text)), (200, "info\n"));
    let put = |filter: &str| {
        format!(
            "PUT /log-level HTTP/1.1\r\ncontent-length: {}\r\n\r\n{filter}",
            filter.len()
        )
    };
    let (status, text) = ask(admin, put("p3proxy=debug").as_bytes()).await;
    assert_eq!((status, body(&text)), (200, "p3proxy=debug\n"), "{text}");
    assert_eq!(*filter.lock().unwrap(), "p3proxy=debug");
    let (status, text) = ask(admin, put("p3proxy=[").as_bytes()).await;
    assert_eq!(status, 400, "{text}");
    assert!(body(&text).starts_with("invalid log filter: "), "{text}");
    assert_eq!(*filter.lock().unwrap(), "p3proxy=debug");

    // What it does not have, or not that way.
    assert_eq!(get(admin, "/").await.0, 404);
    assert_eq!(get(admin, "/debug").await.0, 404);
    let (status, text) = ask(
        admin,
        b"POST /metrics HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert!(text.contains("\r\nallow: GET\r\n"), "{text}");
    let (status, text) = ask(admin, b"DELETE /log-level HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 405);
    assert!(text.contains("\r\nallow: GET, PUT\r\n"), "{text}");
    assert_eq!(ask(admin, put("").as_bytes()).await.0, 400);
    assert_eq!(ask(admin, b"\x16\x03\x01\x00\xa5\r\n\r\n").await.0, 400);
    assert_eq!(ask(admin, b"GET /metrics\r\n\r\n").await.0, 400);
    let huge = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(20_000));
    assert_eq!(ask(admin, huge.as_bytes()).await.0, 413);
    // A client that closes before a whole request gets nothing, and the surface lives on.
    drop(TcpStream::connect(admin).await.unwrap());
    assert_eq!(get(admin, "/ready").await.0, 200);

    // Shutting down: not ready any more.
    stop.send(()).unwrap();
    proxy.await.unwrap();
    let (status, text) = get(admin, "/ready").await;
    assert_eq!((status, body(&text)), (503, "not ready\n"));
}
