//! Compression inside the frame (negotiated in `Hello` / `Welcome`).
//!
//! A catch-up page or a push batch is CBOR full of repeated type names, field names and ids
//! (the Automerge changes inside are already compact), so DEFLATE shrinks it several times
//! over. WebSocket's own permessage-deflate would do the same, but neither side's stack
//! offers it (axum's WebSocket has no deflate), so the frame carries it: a compressed frame is
//! [`DEFLATE_TAG`] followed by a raw DEFLATE stream of the ordinary frame. A CBOR frame begins
//! with an array header (`0x82`), never with `0x00`, so the two cannot be confused.
//!
//! Either side decodes both forms; each side sends compressed frames only to a peer that said
//! it reads them (a device in `Hello`, a relay in `Welcome`), so older peers keep working.
//! Inflating is bounded like everything else from the network: a frame that would inflate past
//! [`MAX_MESSAGE_BYTES`] is refused after reading at most one byte more than the limit.

use std::borrow::Cow;
use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;

use super::{MAX_MESSAGE_BYTES, WireError};

/// The first bytes of a compressed frame: `0x00` (not a CBOR array) and the method (1 = DEFLATE).
pub const DEFLATE_TAG: [u8; 2] = [0x00, 0x01];
/// Frames shorter than this go as they are: a ping or an acknowledgement would not shrink
/// enough to pay for the CPU.
pub const COMPRESS_FROM_BYTES: usize = 1024;
/// DEFLATE level: 1 (fastest) already takes most of what a higher level would on this data,
/// at a fraction of the CPU (README, "Bytes on the wire").
const LEVEL: u32 = 1;

/// `frame` compressed, if it is long enough and compression makes it shorter; else `frame`.
pub fn compress(frame: Vec<u8>) -> Vec<u8> {
    if frame.len() < COMPRESS_FROM_BYTES {
        return frame;
    }
    let mut out = Vec::with_capacity(frame.len() / 3 + DEFLATE_TAG.len());
    out.extend_from_slice(&DEFLATE_TAG);
    let mut encoder = DeflateEncoder::new(out, Compression::new(LEVEL));
    // Writing into a Vec cannot fail.
    let compressed = encoder.write_all(&frame).and_then(|()| encoder.finish());
    match compressed {
        Ok(out) if out.len() < frame.len() => out,
        _ => frame,
    }
}

/// The ordinary frame inside `bytes` (as is when it is not compressed).
pub fn inflate(bytes: &[u8]) -> Result<Cow<'_, [u8]>, WireError> {
    let Some(stream) = bytes.strip_prefix(&DEFLATE_TAG) else {
        if bytes.first() == Some(&0x00) {
            return Err(WireError::Malformed("unknown frame compression".into()));
        }
        return Ok(Cow::Borrowed(bytes));
    };
    let limit = MAX_MESSAGE_BYTES as u64 + 1;
    let mut out = Vec::with_capacity(stream.len().saturating_mul(4).min(MAX_MESSAGE_BYTES));
    DeflateDecoder::new(stream)
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| WireError::Malformed(format!("compressed frame: {e}")))?;
    if out.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge(out.len()));
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_repetitive_frame_shrinks_and_comes_back_whole() {
        let frame: Vec<u8> = std::iter::once(0x82)
            .chain((0..20_000u32).flat_map(|i| format!("patient-{}", i % 50).into_bytes()))
            .collect();
        let compressed = compress(frame.clone());
        assert!(compressed.starts_with(&DEFLATE_TAG));
        assert!(
            compressed.len() * 5 < frame.len(),
            "{} of {}",
            compressed.len(),
            frame.len()
        );
        assert_eq!(inflate(&compressed).unwrap().as_ref(), frame.as_slice());
    }

    #[test]
    fn short_or_incompressible_frames_go_as_they_are() {
        let short = vec![0x82, 1, 2, 3];
        assert_eq!(compress(short.clone()), short);
        // Bytes DEFLATE cannot shrink (an xorshift stream).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = std::iter::once(0x82)
            .chain((0..4096).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }))
            .collect();
        assert_eq!(compress(noise.clone()), noise);
        assert!(matches!(inflate(&noise), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn a_frame_that_inflates_past_the_limit_is_refused() {
        let zeros = vec![0u8; MAX_MESSAGE_BYTES + 4096];
        let bomb = compress(zeros);
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        assert!(matches!(inflate(&bomb), Err(WireError::TooLarge(n)) if n == MAX_MESSAGE_BYTES + 1));
    }

    #[test]
    fn a_broken_stream_or_an_unknown_method_is_malformed() {
        assert!(matches!(
            inflate(&[0x00, 0x01, 0xff, 0xff, 0xff]),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(inflate(&[0x00, 0x07, 1, 2]), Err(WireError::Malformed(_))));
    }
}
