//! One client connection: peer check, handshake, then requests one at a time.
//!
//! Whatever a client sends, the worst outcome is that *its* connection gets an error frame and
//! is closed: a bad frame cannot be resynchronised, but it never reaches the rest of the daemon.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use memobuild_protocol::{
    ErrorCode, FrameError, Hello, HelloReply, MAGIC, PROTOCOL_VERSION, Request, Response,
    read_frame, write_frame,
};
use tokio::net::UnixStream;
use tracing::{Instrument, debug, info_span, warn};

use super::Shared;
use super::access::Peer;
use super::requests::{self, HandlerError};
use super::{build, gc};

/// A client that connects and says nothing is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn serve(stream: UnixStream, shared: Arc<Shared>, id: u64) {
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        },
        Err(err) => {
            warn!(%err, "could not read peer credentials; dropping connection");
            return;
        }
    };
    let span = info_span!("connection", id, uid = peer.uid, pid = peer.pid);
    shared.connections_total.fetch_add(1, Ordering::Relaxed);
    shared.connections_active.fetch_add(1, Ordering::Relaxed);
    let outcome = Connection {
        stream,
        shared: Arc::clone(&shared),
        peer,
    }
    .run()
    .instrument(span)
    .await;
    shared.connections_active.fetch_sub(1, Ordering::Relaxed);
    if let Some(stream) = outcome {
        shared.held_until_exit.lock().await.push(stream);
    }
}

#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    shared: Arc<Shared>,
    peer: Peer,
}

/// What to do with the connection after a request.
enum Next {
    Continue,
    /// The client asked for shutdown: keep its stream open until the process exits.
    HoldUntilExit,
}

impl Connection {
    /// Returns the stream when it must outlive this task.
    async fn run(mut self) -> Option<UnixStream> {
        if !self.handshake().await {
            return None;
        }
        let mut shutdown = self.shared.shutdown.subscribe();
        loop {
            let frame = tokio::select! {
                // Only an idle connection is closed here; a request in progress runs to its
                // end (or to the end of the shutdown grace period).
                _ = shutdown.wait_for(|stop| *stop) => return None,
                frame = read_frame::<_, Request>(&mut self.stream) => frame,
            };
            let request = match frame {
                Ok(Some(request)) => request,
                Ok(None) => return None,
                Err(err) => {
                    self.reject_frame(err).await;
                    return None;
                }
            };
            self.shared.requests_total.fetch_add(1, Ordering::Relaxed);
            let span = info_span!("request", kind = request.name());
            match self.handle(request).instrument(span).await {
                Ok(Next::Continue) => {}
                Ok(Next::HoldUntilExit) => return Some(self.stream),
                Err(err) => {
                    debug!(%err, "client went away mid-answer");
                    return None;
                }
            }
        }
    }

    /// Reads the client's hello and answers it; `false` means the connection is over.
    async fn handshake(&mut self) -> bool {
        let hello =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame::<_, Hello>(&mut self.stream))
                .await
            {
                Err(_) => {
                    debug!("no handshake within {HANDSHAKE_TIMEOUT:?}");
                    return false;
                }
                Ok(Ok(None)) => return false,
                Ok(Ok(Some(hello))) => hello,
                Ok(Err(err)) => {
                    let (code, message) = frame_error_reply(&err);
                    self.refuse(code, format!("handshake: {message}")).await;
                    return false;
                }
            };
        if hello.magic != MAGIC {
            self.refuse(
                ErrorCode::InvalidInput,
                "not a memobuild client (bad handshake magic)".into(),
            )
            .await;
            return false;
        }
        if let Err(message) = self.shared.access.check(self.peer) {
            warn!(uid = self.peer.uid, "refused by the socket access rule");
            self.refuse(ErrorCode::PermissionDenied, message).await;
            return false;
        }
        if hello.protocol_version != PROTOCOL_VERSION {
            let message = format!(
                "client {} speaks protocol {}, this daemon ({}) speaks protocol {PROTOCOL_VERSION}; \
                 run `memobuild daemon restart` to start a daemon that matches the client",
                hello.client_version,
                hello.protocol_version,
                memobuild_protocol::PACKAGE_VERSION
            );
            self.refuse(ErrorCode::VersionMismatch, message).await;
            return false;
        }
        write_frame(&mut self.stream, &HelloReply::accepted(std::process::id()))
            .await
            .is_ok()
    }

    async fn refuse(&mut self, code: ErrorCode, message: String) {
        debug!(%code, %message, "refusing connection");
        let reply = HelloReply::refused(std::process::id(), code, message);
        // The peer may already be gone; there is nobody left to tell.
        let _ = write_frame(&mut self.stream, &reply).await;
    }

    async fn reject_frame(&mut self, err: FrameError) {
        warn!(%err, "bad request frame; closing connection");
        let (code, message) = frame_error_reply(&err);
        let reply = Response::error(code, format!("{message}; closing this connection"));
        let _ = write_frame(&mut self.stream, &reply).await;
    }

    async fn handle(&mut self, request: Request) -> Result<Next, FrameError> {
        let reply = match request {
            Request::Status => Response::Status(self.shared.status()),
            Request::Shutdown => {
                write_frame(&mut self.stream, &Response::ShuttingDown).await?;
                self.shared.request_shutdown("shutdown request");
                return Ok(Next::HoldUntilExit);
            }
            Request::Build(request) => {
                build::serve(&mut self.stream, &self.shared, request, self.peer).await?;
                return Ok(Next::Continue);
            }
            Request::Images => build::images(&self.shared.engine).await,
            Request::Gc(request) => gc::gc(&self.shared.engine, request).await,
            Request::CacheStats => Response::CacheStats(gc::cache_stats(&self.shared.engine)),
            Request::Push(request) => {
                build::push(&mut self.stream, &self.shared.engine, request).await?;
                return Ok(Next::Continue);
            }
            Request::RemoveImage(name) => build::remove_image(&self.shared.engine, &name).await,
            Request::Graph(request) => respond(requests::graph(&request, self.peer)),
            Request::Watch(request) => respond(
                requests::watch(&self.shared.hub, &self.shared.prebuilds, request, self.peer).await,
            ),
            Request::Unwatch(request) => {
                respond(requests::unwatch(&self.shared.hub, &self.shared.prebuilds, request).await)
            }
            Request::Notify(request) => {
                respond(requests::notify(&self.shared.hub, &self.shared.prebuilds, request).await)
            }
            Request::PrebuildLog(request) => respond(requests::prebuild_log(
                &self.shared.prebuilds,
                &request,
                self.peer,
            )),
            Request::DumpDockerfile(request) => {
                respond(requests::dump_dockerfile(&request, self.peer))
            }
        };
        write_frame(&mut self.stream, &reply).await?;
        Ok(Next::Continue)
    }
}

fn respond(result: Result<Response, HandlerError>) -> Response {
    result.unwrap_or_else(|err| {
        debug!(%err, code = %err.code(), "request failed");
        err.into_response()
    })
}

fn frame_error_reply(err: &FrameError) -> (ErrorCode, String) {
    let code = match err {
        FrameError::TooLarge { .. } => ErrorCode::ResourceExhausted,
        FrameError::Io(_) => ErrorCode::Unavailable,
        FrameError::Truncated { .. } | FrameError::Decode { .. } | FrameError::Encode { .. } => {
            ErrorCode::InvalidInput
        }
    };
    (code, err.to_string())
}
