//! The Prometheus endpoint: `GET /metrics` answered with prometheus-client's text encoding of a
//! [`Registry`], over hyper's HTTP/1, until shutdown.
//!
//! Each connection is answered and closed (no keep-alive) within [`CONNECTION_TIMEOUT`]. Failed
//! accepts (out of file descriptors, say) are logged and retried after a growing pause, so the
//! loop never spins.
//!
//! # Usage
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use prometheus_client::registry::Registry;
//! let registry = Arc::new(Registry::with_prefix("quva_demo"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
//! let stop = tokio::sync::oneshot::channel::<()>();
//! tokio::spawn(quva_daemon::metrics::serve(listener, registry, async move {
//!     let _ = stop.1.await;
//! }));
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

/// The content type of prometheus-client's text encoding (OpenMetrics 1.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The longest a scrape connection may stay open.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The first pause after a failed accept; it doubles up to [`MAX_ACCEPT_BACKOFF`].
pub const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// The longest pause after failed accepts.
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; a collector's own error leaves what it wrote.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "metrics encoding failed");
    }
    out
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send,
) {
    accept_loop(
        || async { listener.accept().await.map(|(s, _)| s) },
        registry,
        shutdown,
    )
    .await;
}

/// The accept loop over any source of connections (tests make accept fail).
async fn accept_loop<S, A, F>(
    mut accept: A,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()> + Send,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: FnMut() -> F,
    F: Future<Output = std::io::Result<S>>,
{
    tokio::pin!(shutdown);
    let mut backoff = MIN_ACCEPT_BACKOFF;
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            a = accept() => a,
        };
        match accepted {
            Ok(stream) => {
                backoff = MIN_ACCEPT_BACKOFF;
                tokio::spawn(answer(stream, registry.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "metrics endpoint cannot accept");
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

/// Answers the requests of one connection, then closes it.
async fn answer<S>(stream: S, registry: Arc<Registry>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let registry = registry.clone();
        async move { Ok::<_, Infallible>(respond(&req, &registry)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection failed"),
        Err(_) => tracing::debug!("metrics connection timed out"),
    }
}

/// `GET /metrics` (or HEAD) gets the exposition, anything else 404 or 405.
fn respond(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if req.uri().path() != "/metrics" {
        (StatusCode::NOT_FOUND, "text/plain", Bytes::new())
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        (StatusCode::METHOD_NOT_ALLOWED, "text/plain", Bytes::new())
    } else {
        (StatusCode::OK, CONTENT_TYPE, Bytes::from(render(registry)))
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn registry() -> (Arc<Registry>, Counter) {
        let mut r = Registry::with_prefix("quva_test");
        let c = Counter::default();
        r.register("scrapes", "Scrapes seen", c.clone());
        (Arc::new(r), c)
    }

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("the server closes the connection")
            .unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_stops_on_shutdown() {
        let (reg, counter) = registry();
        counter.inc_by(3);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, reg, async move {
            let _ = stopped.await;
        }));
        for req in [
            "GET /metrics HTTP/1.0\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            let out = get(addr, req).await;
            assert!(out.starts_with("HTTP/1."), "{out}");
            assert!(out.contains(" 200 OK"), "{out}");
            assert!(
                out.contains("content-type: application/openmetrics-text"),
                "{out}"
            );
            assert!(out.contains("\nquva_test_scrapes_total 3\n"), "{out}");
            assert!(out.ends_with("# EOF\n"), "{out}");
        }
        let out = get(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(out.contains(" 404 "), "{out}");
        let out = get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        assert!(out.contains(" 405 "), "{out}");
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops on shutdown")
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    // Virtual time: the pauses advance the paused clock, so the counts below do not depend on
    // how fast the machine is.
    #[tokio::test(start_paused = true)]
    async fn failing_accepts_back_off_instead_of_spinning() {
        let (reg, _) = registry();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let accept = move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err::<tokio::net::TcpStream, _>(std::io::Error::other("too many open files")) }
        };
        accept_loop(accept, reg, tokio::time::sleep(Duration::from_millis(500))).await;
        let n = calls.load(Ordering::SeqCst);
        // 10 + 20 + 40 + 80 + 160 ms of pauses fit in 500 ms: about six attempts, not millions.
        assert!((2..=10).contains(&n), "{n} accepts in 500 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_interrupts_a_backoff_pause() {
        let (reg, _) = registry();
        let accept = || async { Err::<tokio::net::TcpStream, _>(std::io::Error::other("no")) };
        // Virtual time: failures at 0, 10 and 30 ms start pauses of 10, 20 and 40 ms; shutdown at
        // 50 ms comes during the third, which would end at 70 ms. The loop must end at 50 ms, so
        // before a deadline halfway between the two.
        let shutdown_at = MIN_ACCEPT_BACKOFF * 5;
        let pause_ends = MIN_ACCEPT_BACKOFF * (1 + 2 + 4);
        tokio::select! {
            biased;
            () = accept_loop(accept, reg, tokio::time::sleep(shutdown_at)) => {}
            () = tokio::time::sleep((shutdown_at + pause_ends) / 2) => {
                panic!("the loop waited for its back-off pause to end before seeing shutdown");
            }
        }
    }
}
