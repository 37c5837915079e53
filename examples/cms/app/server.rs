//! The HTTP server around the router: hyper with a header-read timeout, the
//! limits that turn oversized requests into JSON answers, and a graceful
//! shutdown that lets requests in flight finish.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::error::ApiError;

/// How long a client may take to send a request's head.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole request may take, body included.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest URI, and the most bytes of header names and values, answered
/// with 414 and 431 in JSON. hyper itself reads heads up to [`MAX_HEAD`]
/// and answers a bigger one with a bare 431 before the router sees it.
pub(crate) const MAX_URI: usize = 8 * 1024;
pub(crate) const MAX_HEADERS: usize = 16 * 1024;
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most request headers, answered with 431 in JSON past it. hyper
/// parses up to [`MAX_PARSED_HEADERS`] and answers more with a bare 431.
pub(crate) const MAX_HEADER_COUNT: usize = 100;
pub(crate) const MAX_PARSED_HEADERS: usize = 1000;
/// The most connections open at once; more wait in the listen backlog.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` completes, then lets the
/// connections finish what they are doing, for [`DRAIN`] at most.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_headers(MAX_PARSED_HEADERS)
        .max_buf_size(MAX_HEAD);
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A free slot first: past MAX_CONNECTIONS, clients wait in the
        // kernel's backlog, not in our memory.
        let slot = tokio::select! {
            slot = connections.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, most likely: pause instead of
                    // spinning on the error.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            // hyper's header-read timeout starts at the first byte: a client
            // that sends nothing gets the same deadline here.
            let mut first = [0_u8; 1];
            match tokio::time::timeout(HEADER_READ_TIMEOUT, stream.peek(&mut first)).await {
                Ok(Ok(1..)) => {}
                // Closed, failed, or silent until the deadline.
                Ok(Ok(0) | Err(_)) | Err(_) => return,
            }
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still running after {DRAIN:?}; leaving them");
    }
}

/// Answers an oversized URI with 414, and too many or too big headers with
/// 431.
pub(crate) async fn limits(request: Request, next: Next) -> Response {
    if request.uri().to_string().len() > MAX_URI {
        return ApiError::Status(
            StatusCode::URI_TOO_LONG,
            format!("the URI is over the limit of {MAX_URI} bytes"),
        )
        .into_response();
    }
    if request.headers().len() > MAX_HEADER_COUNT {
        return ApiError::Status(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the request has over {MAX_HEADER_COUNT} headers"),
        )
        .into_response();
    }
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers > MAX_HEADERS {
        return ApiError::Status(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the headers are over the limit of {MAX_HEADERS} bytes"),
        )
        .into_response();
    }
    next.run(request).await
}

/// Gives every error answer that is not JSON the JSON body the handlers'
/// errors have: those without a body (the router's 405, the timeout's 408)
/// and axum's own rejections in text/plain (a path segment that is not
/// UTF-8), whose text becomes the message.
pub(crate) async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // A rejection's text is a line or two; a longer one is cut off.
    let text = match axum::body::to_bytes(body, REJECTION_TEXT).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this route".to_owned(),
        StatusCode::REQUEST_TIMEOUT => {
            format!("the request took longer than {REQUEST_TIMEOUT:?}")
        }
        _ if !text.is_empty() => text,
        other => other.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let json = ApiError::Status(status, message).into_response();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.extend(json.headers().clone());
    Response::from_parts(parts, json.into_body())
}

/// The most bytes of a non-JSON error body read into a JSON message.
const REJECTION_TEXT: usize = 4096;

/// A server on a task of its own, on an ephemeral port of 127.0.0.1: what
/// the tests and the load driver run.
#[allow(dead_code)]
pub(crate) struct Background {
    pub(crate) url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

#[allow(dead_code)]
impl Background {
    pub(crate) async fn start(state: std::sync::Arc<super::AppState>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, super::router(state), async move {
            let _ = stopped.await;
        }));
        Ok(Self { url, stop, task })
    }

    /// Stops accepting and waits for the requests in flight, as Ctrl-C does.
    pub(crate) async fn stop(self) -> Result<(), tokio::task::JoinError> {
        let _ = self.stop.send(());
        self.task.await
    }
}
