//! The admin surface on the metrics listener, sans-IO: an HTTP/1.1 request is parsed
//! from bytes, routed to what it asks for, and the answer encoded to bytes; the shell
//! (`io::admin`) reads, fills the body in, and writes. Modelled on linkerd2-proxy's
//! admin port: `/metrics`, `/ready`, a state dump, and the log level at run time.
//! Bad requests get a 4xx answer, never a panic; one request per connection.

/// The longest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// The longest request body accepted (a log filter).
pub const MAX_BODY: usize = 4 * 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent.
    pub method: String,
    /// The path without its query.
    pub path: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
}

/// Why a request could not be parsed; each has the status it is answered with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Not an HTTP/1.x request line, or a header without a colon.
    #[error("malformed request")]
    Malformed,
    /// The head or the body is too long.
    #[error("request too large")]
    TooLarge,
}

impl RequestError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Malformed => 400,
            RequestError::TooLarge => 413,
        }
    }
}

/// Parses a request from the bytes read so far: `Ok(None)` until it is complete.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, RequestError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Err(RequestError::TooLarge)
        } else {
            Ok(None)
        };
    };
    if end > MAX_HEAD {
        return Err(RequestError::TooLarge);
    }
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| RequestError::Malformed)?;
    let mut lines = head.split("\r\n");
    let line = lines.next().ok_or(RequestError::Malformed)?;
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(RequestError::Malformed);
    };
    if !version.starts_with("HTTP/1.")
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
    {
        return Err(RequestError::Malformed);
    }
    let mut length = 0usize;
    for header in lines {
        let (name, value) = header.split_once(':').ok_or(RequestError::Malformed)?;
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().map_err(|_| RequestError::Malformed)?;
        }
    }
    if length > MAX_BODY {
        return Err(RequestError::TooLarge);
    }
    let body_start = end + 4;
    if buf.len() < body_start + length {
        return Ok(None);
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok(Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        body: buf[body_start..body_start + length].to_vec(),
    }))
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics`: the Prometheus exposition.
    Metrics,
    /// `GET /live`: 200 while the process answers (startup and liveness probes).
    Live,
    /// `GET /ready`: 200 once serving and the redirect is seen to reach the proxy,
    /// 503 before and while shutting down.
    Ready,
    /// `GET /debug/state`: the proxy's state as JSON.
    State,
    /// `GET /log-level`: the log filter in use.
    LogLevel,
    /// `PUT /log-level` with a filter (`debug`, `p3proxy=trace,info`): sets it.
    SetLogLevel(String),
    /// A path this surface does not have.
    NotFound,
    /// A known path with another method; the methods it allows.
    MethodNotAllowed(&'static str),
    /// A body that is not a UTF-8 log filter.
    BadBody,
}

/// Routes a parsed request.
pub fn route(req: &Request) -> Route {
    let get = req.method == "GET";
    match req.path.as_str() {
        "/metrics" if get => Route::Metrics,
        "/live" if get => Route::Live,
        "/ready" if get => Route::Ready,
        "/debug/state" if get => Route::State,
        "/log-level" if get => Route::LogLevel,
        "/log-level" if req.method == "PUT" => match std::str::from_utf8(&req.body) {
            Ok(s) if !s.trim().is_empty() => Route::SetLogLevel(s.trim().to_string()),
            _ => Route::BadBody,
        },
        "/log-level" => Route::MethodNotAllowed("GET, PUT"),
        "/metrics" | "/live" | "/ready" | "/debug/state" => Route::MethodNotAllowed("GET"),
        _ => Route::NotFound,
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Its content type.
    pub content_type: &'static str,
    /// Methods allowed (sent as `Allow` on a 405).
    pub allow: Option<&'static str>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A plain-text answer.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            allow: None,
            body: body.into().into_bytes(),
        }
    }

    /// A JSON answer.
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            allow: None,
            body: body.into_bytes(),
        }
    }

    /// The answer to a route the shell needs nothing for, if it is one.
    pub fn for_route(route: &Route) -> Option<Response> {
        match route {
            Route::NotFound => Some(Response::text(404, "not found\n")),
            Route::MethodNotAllowed(allow) => Some(Response {
                allow: Some(allow),
                ..Response::text(405, "method not allowed\n")
            }),
            Route::BadBody => Some(Response::text(400, "the body must be a log filter\n")),
            _ => None,
        }
    }

    /// The bytes on the wire (the connection closes after it).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            out.push_str(&format!("allow: {allow}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &str) -> Request {
        parse_request(raw.as_bytes())
            .expect("parses")
            .expect("complete")
    }

    #[test]
    fn a_request_is_complete_only_with_its_head_and_body() {
        let raw = "PUT /log-level HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\ndebug";
        for cut in 0..raw.len() {
            assert_eq!(parse_request(&raw.as_bytes()[..cut]), Ok(None), "{cut}");
        }
        let req = parsed(raw);
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/log-level");
        assert_eq!(req.body, b"debug");
        assert_eq!(route(&req), Route::SetLogLevel("debug".into()));
    }

    #[test]
    fn routes_and_their_status() {
        let cases = [
            ("GET /metrics HTTP/1.1", Route::Metrics),
            ("GET /metrics?x=1 HTTP/1.0", Route::Metrics),
            ("GET /ready HTTP/1.1", Route::Ready),
            ("GET /live HTTP/1.1", Route::Live),
            ("HEAD /live HTTP/1.1", Route::MethodNotAllowed("GET")),
            ("GET /debug/state HTTP/1.1", Route::State),
            ("GET /log-level HTTP/1.1", Route::LogLevel),
            ("POST /metrics HTTP/1.1", Route::MethodNotAllowed("GET")),
            (
                "DELETE /log-level HTTP/1.1",
                Route::MethodNotAllowed("GET, PUT"),
            ),
            ("PUT /log-level HTTP/1.1", Route::BadBody),
            ("GET / HTTP/1.1", Route::NotFound),
            ("GET /debug HTTP/1.1", Route::NotFound),
        ];
        for (line, want) in cases {
            let req = parsed(&format!("{line}\r\nhost: a\r\n\r\n"));
            assert_eq!(route(&req), want, "{line}");
        }
        let r = Response::for_route(&Route::MethodNotAllowed("GET")).unwrap();
        let wire = String::from_utf8(r.encode()).unwrap();
        assert!(
            wire.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{wire}"
        );
        assert!(wire.contains("\r\nallow: GET\r\n"), "{wire}");
        assert!(wire.ends_with("\r\n\r\nmethod not allowed\n"), "{wire}");
        assert_eq!(Response::for_route(&Route::NotFound).unwrap().status, 404);
        assert_eq!(Response::for_route(&Route::BadBody).unwrap().status, 400);
        assert_eq!(Response::for_route(&Route::Metrics), None);
    }

    #[test]
    fn malformed_and_oversized_requests_are_refused_with_their_status() {
        for raw in [
            "GET\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "GET /metrics SPDY/3\r\n\r\n",
            "get /metrics HTTP/1.1\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1 extra\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
            "PUT /log-level HTTP/1.1\r\ncontent-length: many\r\n\r\n",
        ] {
            let err = parse_request(raw.as_bytes()).unwrap_err();
            assert_eq!(err.status(), 400, "{raw:?}");
        }
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse_request(long.as_bytes()), Err(RequestError::TooLarge));
        let endless = "a".repeat(MAX_HEAD + 1);
        assert_eq!(
            parse_request(endless.as_bytes()),
            Err(RequestError::TooLarge)
        );
        let body = format!(
            "PUT /log-level HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(parse_request(body.as_bytes()).unwrap_err().status(), 413);
        assert_eq!(
            parse_request(b"GET /\xff HTTP/1.1\r\n\r\n"),
            Err(RequestError::Malformed)
        );
    }

    #[test]
    fn a_response_carries_its_length_and_type() {
        let r = Response::json(200, "{\"a\":1}".into());
        let wire = String::from_utf8(r.encode()).unwrap();
        assert!(wire.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(wire.contains("content-type: application/json\r\n"));
        assert!(wire.contains("content-length: 7\r\n"));
        assert!(wire.ends_with("\r\n\r\n{\"a\":1}"));
        assert!(String::from_utf8(Response::text(503, "no").encode())
            .unwrap()
            .starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    }
}
