//! One client connection: peer check, handshake, then requests one at a time.
//!
//! Whatever a client sends, the worst outcome is that *its* connection gets an error frame and
//! is closed: a bad frame cannot be resynchronised, but it never reaches the rest of the daemon.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use memobuild_protocol::{
    ErrorCode, FrameError, Hello, HelloReply, MAGIC, PROTOCOL_VERSION, Request, Response,
    read_frame, read_frame_len, read_payload, write_frame,
};
use tokio::net::UnixStream;
use tracing::{Instrument, debug, info_span, warn};

use super::Shared;
use super::access::Peer;
use super::requests::{self, HandlerError};
use super::{build, gc};
use crate::caller::{Caller, peer_groups};

/// A client that connects and says nothing is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request frame that has started to arrive must be whole within this long: a client that
/// trickles a large frame holds neither its buffer nor its connection longer.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Request bytes all connections together may be receiving at once (each connection at most
/// one frame of `MAX_FRAME_LEN`): twenty slow 16 MiB frames cannot pin 320 MB.
pub(crate) const RECEIVING_BYTES: usize = 48 << 20;

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
    let caller = Caller {
        uid: peer.uid,
        gid: peer.gid,
        groups: peer_groups(std::os::fd::AsFd::as_fd(&stream)),
    };
    let span = info_span!("connection", id, uid = peer.uid, pid = peer.pid);
    shared.connections_total.fetch_add(1, Ordering::Relaxed);
    shared.connections_active.fetch_add(1, Ordering::Relaxed);
    let outcome = Connection {
        stream,
        shared: Arc::clone(&shared),
        peer,
        caller,
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
    /// Who the daemon reads for on this connection.
    caller: Caller,
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
            let len = tokio::select! {
                // Only an idle connection is closed here; a request in progress runs to its
                // end (or to the end of the shutdown grace period).
                _ = shutdown.wait_for(|stop| *stop) => return None,
                len = read_frame_len(&mut self.stream) => len,
            };
            let request = match len {
                Ok(Some(len)) => self.read_request(len).await?,
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

    /// Reads a request whose `len`-byte frame has started to arrive: it must arrive whole
    /// within [`FRAME_TIMEOUT`], and its bytes count against what all connections together
    /// may be receiving ([`RECEIVING_BYTES`]). `None`: the connection is over.
    async fn read_request(&mut self, len: u32) -> Option<Request> {
        let shared = Arc::clone(&self.shared);
        let Ok(_receiving) = shared.receiving.try_acquire_many(len) else {
            warn!(
                len,
                "too many request bytes arriving at once; refusing this one"
            );
            let reply = Response::error(
                ErrorCode::ResourceExhausted,
                format!(
                    "the daemon is receiving too many large requests at once ({len}-byte \
                     frame refused); try again; closing this connection"
                ),
            );
            let _ = write_frame(&mut self.stream, &reply).await;
            return None;
        };
        match tokio::time::timeout(FRAME_TIMEOUT, read_payload(&mut self.stream, len)).await {
            Ok(Ok(request)) => Some(request),
            Ok(Err(err)) => {
                self.reject_frame(err).await;
                None
            }
            Err(_) => {
                warn!(
                    len,
                    "a request frame did not arrive within {FRAME_TIMEOUT:?}; closing"
                );
                let reply = Response::error(
                    ErrorCode::InvalidInput,
                    format!(
                        "a {len}-byte request did not arrive within {FRAME_TIMEOUT:?}; \
                         closing this connection"
                    ),
                );
                let _ = write_frame(&mut self.stream, &reply).await;
                None
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
        if let Err(message) = self.shared.access.check(self.peer, &self.caller.groups) {
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
                build::serve(&mut self.stream, &self.shared, request, &self.caller).await?;
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
            Request::Graph(request) => respond(requests::graph(&request, &self.caller)),
            Request::Watch(request) => respond(
                requests::watch(
                    &self.shared.hub,
                    &self.shared.prebuilds,
                    request,
                    &self.caller,
                )
                .await,
            ),
            Request::Unwatch(request) => {
                respond(requests::unwatch(&self.shared.hub, &self.shared.prebuilds, request).await)
            }
            Request::Notify(request) => respond(
                requests::notify(
                    &self.shared.hub,
                    &self.shared.prebuilds,
                    request,
                    &self.caller,
                )
                .await,
            ),
            Request::PrebuildLog(request) => respond(requests::prebuild_log(
                &self.shared.prebuilds,
                &request,
                &self.caller,
            )),
            Request::DumpDockerfile(request) => {
                respond(requests::dump_dockerfile(&request, &self.caller))
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
