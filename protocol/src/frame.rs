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
    match read_frame_len(reader).await? {
        Some(len) => read_payload(reader, len).await.map(Some),
        None => Ok(None),
    }
}

/// Reads a frame's length prefix, checked against [`MAX_FRAME_LEN`]. `Ok(None)` means the
/// peer closed the connection cleanly between frames. With [`read_payload`], for a reader
/// that treats the wait for a frame and the frame itself differently (timeouts, budgets).
pub async fn read_frame_len<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<u32>, FrameError> {
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
    Ok(Some(len))
}

/// Reads and decodes the `len`-byte payload that follows a prefix. The buffer grows as the
/// bytes arrive: a peer that announces a large frame and sends it slowly holds only what it
/// has sent (twice that at most), not the announced size.
pub async fn read_payload<R, T>(reader: &mut R, len: u32) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    const FIRST: usize = 64 * 1024;
    let len = len as usize;
    let mut payload = Vec::with_capacity(len.min(FIRST));
    while payload.len() < len {
        if payload.len() == payload.capacity() {
            let more = payload.capacity().min(len - payload.len());
            payload.reserve_exact(more);
        }
        let room = (payload.capacity() - payload.len()).min(len - payload.len());
        let n = (&mut *reader)
            .take(room as u64)
            .read_buf(&mut payload)
            .await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                expected: len,
                got: payload.len(),
            });
        }
    }
    decode(&payload)
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
    async fn a_large_payload_arrives_whole_and_a_short_one_is_truncated() {
        let big = Request::Notify(crate::messages::NotifyRequest {
            paths: (0..50_000).map(|i| format!("/p/{i}").into()).collect(),
        });
        let mut wire = Vec::new();
        write_frame(&mut wire, &big).await.expect("write");
        assert!(wire.len() > 256 * 1024, "{}", wire.len());
        let back: Request = read_frame(&mut wire.as_slice())
            .await
            .expect("read")
            .expect("a frame");
        assert!(matches!(back, Request::Notify(n) if n.paths.len() == 50_000));
        // Announced big, sent short: what arrived is reported, nothing more was needed.
        let mut short = (MAX_FRAME_LEN).to_be_bytes().to_vec();
        short.extend(vec![0u8; 100_000]);
        let err = read_frame::<_, Request>(&mut short.as_slice())
            .await
            .expect_err("truncated");
        assert!(
            matches!(err, FrameError::Truncated { got: 100_000, .. }),
            "{err}"
        );
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
