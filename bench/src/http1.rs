//! The load driver's HTTP client: plain HTTP/1.1 keep-alive connections on loopback, kept in a
//! bounded pool, one request at a time on each.
//!
//! Why not reqwest, which the setup still uses: the driver shares the two cores with what it
//! measures, and reqwest's general-purpose layers (URL parsing, its pool, redirects, a timer per
//! request) cost it about 36 µs of CPU per request in the closed loop and 68 µs in the open loop
//! (`driver_cpu_cores` in the JSON). Every microsecond the driver spends is taken from the
//! system under test, not from the lock-bound baseline, so a heavy driver understates the ratio.
//! This client speaks exactly what the scenarios need: a POST with a body, read to the end.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper_util::rt::TokioIo;

use crate::report::TransportError;

/// What a request came to: the status and whether the answer was a replay, or no answer.
pub type Answer = Result<(u16, bool), TransportError>;

/// A bounded pool of HTTP/1.1 connections to one `http://host:port` target.
pub struct Http1Client {
    address: String,
    host: HeaderValue,
    json: HeaderValue,
    /// Idle connections; at most `idle_max` are kept, the rest are closed when returned.
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    idle_max: usize,
    /// Longest a request may take, from taking a connection to the end of the body.
    timeout: Duration,
}

impl Http1Client {
    /// `base_url` is `http://host:port` (no path, no TLS: the driver runs on the target's
    /// machine). `idle_max` bounds the connections kept between requests.
    pub fn new(base_url: &str, timeout: Duration, idle_max: usize) -> anyhow::Result<Self> {
        let uri: hyper::Uri = base_url
            .parse()
            .with_context(|| format!("parsing the target URL {base_url}"))?;
        anyhow::ensure!(
            uri.scheme_str() == Some("http"),
            "the load driver speaks plain HTTP: {base_url} is not an http:// URL"
        );
        let authority = uri
            .authority()
            .with_context(|| format!("{base_url} names no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self {
            address: format!("{}:{port}", authority.host()),
            host: HeaderValue::from_str(authority.as_str()).context("the target's host")?,
            json: HeaderValue::from_static("application/json"),
            idle: Mutex::new(Vec::with_capacity(idle_max)),
            idle_max,
            timeout,
        })
    }

    /// POSTs `body` to `path` and reads the answer to its end, within the client's timeout.
    pub async fn post(
        &self,
        path: &str,
        idempotency_key: &str,
        authorization: Option<HeaderValue>,
        body: Vec<u8>,
    ) -> Answer {
        let exchange = async {
            let mut connection = match self.take_idle() {
                Some(mut connection) => match connection.ready().await {
                    Ok(()) => connection,
                    // The server closed it meanwhile: a new connection instead.
                    Err(_) => self.connect().await?,
                },
                None => self.connect().await?,
            };
            let mut request = hyper::Request::post(path)
                .header(HOST, self.host.clone())
                .header(CONTENT_TYPE, self.json.clone())
                .header("idempotency-key", idempotency_key);
            if let Some(authorization) = authorization {
                request = request.header(AUTHORIZATION, authorization);
            }
            let request = request
                .body(Full::new(Bytes::from(body)))
                .map_err(|_| TransportError::Other)?;
            let response = connection
                .send_request(request)
                .await
                .map_err(|_| TransportError::Other)?;
            let status = response.status().as_u16();
            let replayed = response
                .headers()
                .get("idempotent-replayed")
                .is_some_and(|value| value.as_bytes() == b"true");
            // Read to the end, so the connection can carry the next request.
            response
                .into_body()
                .collect()
                .await
                .map_err(|_| TransportError::Other)?;
            self.give_back(connection);
            Ok((status, replayed))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(TransportError::Timeout))
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(connection) = idle.pop() {
            // A connection the server closed is dropped here rather than failing a request.
            if !connection.is_closed() {
                return Some(connection);
            }
        }
        None
    }

    fn give_back(&self, connection: SendRequest<Full<Bytes>>) {
        if connection.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.idle_max
        {
            idle.push(connection);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, TransportError> {
        let stream = tokio::net::TcpStream::connect(&self.address)
            .await
            .map_err(|_| TransportError::Connect)?;
        // Requests are small and answered one at a time: no Nagle delay.
        stream
            .set_nodelay(true)
            .map_err(|_| TransportError::Connect)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| TransportError::Connect)?;
        // The connection's own task ends when the sender is dropped or the server closes it.
        tokio::spawn(connection);
        Ok(sender)
    }
}
