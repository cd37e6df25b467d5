//! The operations endpoint: `GET /metrics` (Prometheus text format of a registry), `GET
//! /healthz` (liveness: 200 while the worker reaches its lease table, 503 otherwise) and `GET
//! /readyz` (readiness: 503 also while a shard is stopped at a bad record, naming each). Bind it
//! to loopback (the default in examples) unless a scraper elsewhere needs it.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use shardflow_core::runtime::Health;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A running endpoint; it stops when dropped.
pub struct OpsServer {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl OpsServer {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves `/metrics` from `registry`, and `/healthz` and `/readyz` from `health`, on `addr`.
///
/// # Errors
/// The address could not be bound.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    health: Health,
) -> std::io::Result<OpsServer> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stopped.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else { continue };
            let registry = registry.clone();
            let health = health.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let response = respond(&req, &registry, &health);
                    async move { Ok::<_, Infallible>(response) }
                });
                // A client that hangs up mid-request is its own problem.
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(OpsServer { addr, stop })
}

fn respond(req: &Request<Incoming>, registry: &Registry, health: &Health) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            b"GET only\n".to_vec(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let encoder = TextEncoder::new();
            let mut body = Vec::new();
            match encoder.encode(&registry.gather(), &mut body) {
                Ok(()) => reply(StatusCode::OK, encoder.format_type(), body),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n").into_bytes(),
                ),
            }
        }
        "/healthz" => {
            let since = health.since_last_ok().map_or_else(
                || "never".to_owned(),
                |d| format!("{:.1}s ago", d.as_secs_f64()),
            );
            if health.is_healthy() {
                reply(
                    StatusCode::OK,
                    "text/plain",
                    format!("ok: lease table reached {since}\n").into_bytes(),
                )
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("unhealthy: lease table last reached {since}\n").into_bytes(),
                )
            }
        }
        "/readyz" => {
            // A supervisor restarting on /healthz would restart a worker straight back into
            // the bad record; readiness is where a stopped shard shows.
            let stopped = health.stopped_shards();
            let mut body = if health.is_healthy() {
                String::new()
            } else {
                "unready: lease table not reached within a lease duration\n".to_owned()
            };
            for what in &stopped {
                body.push_str(&format!("unready: {what}\n"));
            }
            if let Some(stream) = health.waiting_for() {
                body.push_str(&format!(
                    "unready: waiting for stream {stream} to be created (check its name and region)\n"
                ));
            }
            if body.is_empty() {
                reply(StatusCode::OK, "text/plain", b"ready\n".to_vec())
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    body.into_bytes(),
                )
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"/metrics, /healthz or /readyz\n".to_vec(),
        ),
    }
}
