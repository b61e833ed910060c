//! Framing: a big-endian u32 payload length, then that many bytes of postcard.
//!
//! The length is checked against [`MAX_FRAME_LEN`] before anything is allocated, so a hostile
//! or corrupt length prefix costs nothing. A connection that sent a bad frame cannot be
//! resynchronised; the daemon answers with an error and closes it.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest payload either side accepts (16 MiB). Build contexts never travel over the socket
/// (the client sends paths), so this only bounds metadata and log chunks.
pub const MAX_FRAME_LEN: u32 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: u64, max: u32 },
    #[error("connection closed inside a frame: expected {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("malformed {what} frame: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("could not encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("socket i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `message` as one frame (length prefix included).
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let what = std::any::type_name::<T>();
    // Reserve the prefix up front so the payload is written once, in place.
    let mut buf = postcard::to_extend(message, vec![0u8; 4])
        .map_err(|source| FrameError::Encode { what, source })?;
    let len = buf.len() - 4;
    if len > MAX_FRAME_LEN as usize {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: MAX_FRAME_LEN,
        });
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Writes `message` as one frame and flushes it.
pub async fn write_frame<W, T>(writer: &mut W, message: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let buf = encode(message)?;
    writer.write_all(&buf).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one frame. `Ok(None)` means the peer closed the connection cleanly between frames.
pub async fn read_frame<R, T>(reader: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut prefix = [0u8; 4];
    let got = read_full(reader, &mut prefix).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < prefix.len() {
        return Err(FrameError::Truncated {
            expected: prefix.len(),
            got,
        });
    }
    let len = u32::from_be_bytes(prefix);
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: MAX_FRAME_LEN,
        });
    }
    let mut payload = vec![0u8; len as usize];
    let got = read_full(reader, &mut payload).await?;
    if got < payload.len() {
        return Err(FrameError::Truncated {
            expected: payload.len(),
            got,
        });
    }
    decode(&payload).map(Some)
}

/// Decodes one frame's payload (without its length prefix). Trailing bytes are an error:
/// a payload that decodes with bytes to spare was not written by a peer of this version.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let what = std::any::type_name::<T>();
    let (message, rest) =
        postcard::take_from_bytes(payload).map_err(|source| FrameError::Decode { what, source })?;
    if !rest.is_empty() {
        return Err(FrameError::Decode {
            what,
            source: postcard::Error::DeserializeBadEncoding,
        });
    }
    Ok(message)
}

/// Like `read_exact`, but reports how much arrived before end of stream instead of failing,
/// so a clean close can be told from a truncated frame.
async fn read_full<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Hello, Request};

    #[tokio::test]
    async fn round_trips_a_request() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &Request::Status)
            .await
            .expect("write");
        let back: Request = read_frame(&mut wire.as_slice())
            .await
            .expect("read")
            .expect("a frame");
        assert!(matches!(back, Request::Status));
    }

    #[tokio::test]
    async fn clean_eof_is_none() {
        let empty: &[u8] = &[];
        let read: Option<Request> = read_frame(&mut &*empty).await.expect("eof is fine");
        assert!(read.is_none());
    }

    #[tokio::test]
    async fn oversized_prefix_is_rejected_without_reading_the_body() {
        let wire = (MAX_FRAME_LEN + 1).to_be_bytes();
        let err = read_frame::<_, Request>(&mut wire.as_slice())
            .await
            .expect_err("must refuse");
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn truncated_prefix_and_payload_are_reported() {
        let short_prefix = [0u8, 0];
        let err = read_frame::<_, Request>(&mut short_prefix.as_slice())
            .await
            .expect_err("short prefix");
        assert!(matches!(
            err,
            FrameError::Truncated {
                expected: 4,
                got: 2
            }
        ));

        let mut wire = encode(&Hello::current("test")).expect("encode");
        wire.truncate(wire.len() - 3);
        let err = read_frame::<_, Hello>(&mut wire.as_slice())
            .await
            .expect_err("short payload");
        assert!(matches!(err, FrameError::Truncated { .. }), "{err}");
    }

    #[test]
    fn garbage_payload_is_a_decode_error() {
        let err = decode::<Request>(&[0xff, 0xff, 0xff, 0xff, 0x0f]).expect_err("garbage");
        assert!(matches!(err, FrameError::Decode { .. }), "{err}");
        // A valid message followed by junk is also refused.
        let mut payload = postcard::to_stdvec(&Request::Status).expect("encode");
        payload.push(7);
        assert!(decode::<Request>(&payload).is_err());
    }
}
