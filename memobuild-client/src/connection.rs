//! A handshaken connection to the daemon.

use std::path::{Path, PathBuf};

use memobuild_protocol::{
    ErrorCode, ErrorReply, FrameError, Hello, HelloReply, PACKAGE_VERSION, PROTOCOL_VERSION,
    Request, Response, read_frame, write_frame,
};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nobody listens: no socket file, or a stale one. The daemon may be started.
    #[error("no memobuildd is running on {socket}")]
    NotRunning {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "permission denied on {socket}: the daemon serves its own user, root and its socket group ({source})"
    )]
    PermissionDenied {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("memobuildd on {socket} refused the connection: {}", reply.message)]
    Refused {
        socket: PathBuf,
        daemon: HelloReply,
        reply: ErrorReply,
    },
    #[error("connecting to {socket}: {source}")]
    Io {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handshake with {socket}: {source}")]
    Frame {
        socket: PathBuf,
        #[source]
        source: FrameError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Daemon(ErrorReply),
    #[error("talking to the daemon: {0}")]
    Frame(#[from] FrameError),
    #[error("the daemon closed the connection before answering")]
    Closed,
    #[error("the daemon answered `{request}` with an unexpected {response}")]
    Unexpected {
        request: &'static str,
        response: String,
    },
}

#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    daemon: HelloReply,
}

impl Connection {
    /// Connects and performs the handshake.
    pub async fn open(socket: &Path) -> Result<Self, ConnectError> {
        let mut stream = UnixStream::connect(socket)
            .await
            .map_err(|source| classify_connect_error(socket, source))?;
        let frame_err = |source| ConnectError::Frame {
            socket: socket.to_owned(),
            source,
        };
        write_frame(&mut stream, &Hello::current(PACKAGE_VERSION))
            .await
            .map_err(frame_err)?;
        let daemon: HelloReply = read_frame(&mut stream)
            .await
            .map_err(frame_err)?
            .ok_or_else(|| {
                frame_err(FrameError::Truncated {
                    expected: 4,
                    got: 0,
                })
            })?;
        if let Some(reply) = daemon.refusal.clone() {
            return Err(ConnectError::Refused {
                socket: socket.to_owned(),
                daemon,
                reply,
            });
        }
        Ok(Self { stream, daemon })
    }

    /// What the daemon said about itself in the handshake.
    pub fn daemon(&self) -> &HelloReply {
        &self.daemon
    }

    pub async fn send(&mut self, request: &Request) -> Result<(), RequestError> {
        write_frame(&mut self.stream, request).await?;
        Ok(())
    }

    /// The next frame of the answer; a daemon-side error becomes `RequestError::Daemon`.
    pub async fn next(&mut self) -> Result<Response, RequestError> {
        match read_frame::<_, Response>(&mut self.stream).await? {
            Some(Response::Error(reply)) => Err(RequestError::Daemon(reply)),
            Some(response) => Ok(response),
            None => Err(RequestError::Closed),
        }
    }

    /// Sends a request whose answer is a single frame.
    pub async fn call(&mut self, request: &Request) -> Result<Response, RequestError> {
        self.send(request).await?;
        self.next().await
    }

    /// Waits until the daemon closes the connection (after a shutdown request, that is when
    /// its process is gone).
    pub async fn wait_closed(mut self) -> Result<(), RequestError> {
        loop {
            match read_frame::<_, Response>(&mut self.stream).await {
                Ok(None) => return Ok(()),
                Ok(Some(_)) => {}
                // A reset at exit is as good as a close.
                Err(FrameError::Io(_)) => return Ok(()),
                Err(err) => return Err(err.into()),
            }
        }
    }
}

fn classify_connect_error(socket: &Path, source: std::io::Error) -> ConnectError {
    use std::io::ErrorKind;
    let socket = socket.to_owned();
    match source.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
            ConnectError::NotRunning { socket, source }
        }
        ErrorKind::PermissionDenied => ConnectError::PermissionDenied { socket, source },
        _ => ConnectError::Io { socket, source },
    }
}

impl ConnectError {
    /// A refusal because client and daemon speak different protocol versions.
    pub fn is_version_mismatch(&self) -> bool {
        matches!(self, Self::Refused { reply, .. } if reply.code == ErrorCode::VersionMismatch)
    }

    pub fn version_mismatch_hint(&self) -> Option<String> {
        match self {
            Self::Refused { daemon, reply, .. } if reply.code == ErrorCode::VersionMismatch => {
                Some(format!(
                    "client {PACKAGE_VERSION} speaks protocol {PROTOCOL_VERSION}; daemon {} speaks protocol {}. \
                     Run `memobuild daemon restart` to replace the daemon.",
                    daemon.daemon_version, daemon.protocol_version
                ))
            }
            _ => None,
        }
    }
}
