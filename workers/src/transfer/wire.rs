//! The KV transfer wire format (version 1), documented in `workers/KV_TRANSFER.md`: the
//! [`TransferHeader`] a sender opens with, the per-layer frames that follow it, and the [`Reply`] a receiver
//! answers with (once after the header, once after the last frame).
//!
//! Parsing never panics and never allocates more than a limit checked beforehand: every length read from
//! the peer is compared with [`MAX_HEADER_BODY_BYTES`], [`MAX_BLOCK_IDS`], [`MAX_REASON_BYTES`] or the
//! chunk size the receiver expects before any buffer is sized from it.

use bytes::{BufMut, BytesMut};

use super::{RefusalCode, TransferError};
use crate::kv_cache::BlockId;
use crate::kv_cache::layout::KvLayout;

/// First bytes of a transfer header.
pub const HEADER_MAGIC: &[u8; 8] = b"TNDMKVX1";
/// First bytes of a receiver's reply.
pub const REPLY_MAGIC: &[u8; 8] = b"TNDMKVA1";
/// The only version this build speaks.
pub const WIRE_VERSION: u16 = 1;
/// `magic + version u16 + body_len u32`.
pub const HEADER_PREFIX_BYTES: usize = 8 + 2 + 4;
/// `layer u32 + len u32`, before a frame's payload; a crc32 u32 follows the payload.
pub const FRAME_PREFIX_BYTES: usize = 8;
/// `magic + code u8 + reason_len u16`.
pub const REPLY_PREFIX_BYTES: usize = 8 + 1 + 2;
/// The layer index that marks the end frame.
pub const END_FRAME_LAYER: u32 = u32::MAX;
/// The end frame's payload: `has_first_token u8 + first_token_id u32`.
pub const END_FRAME_PAYLOAD_BYTES: usize = 5;

/// Destination blocks one transfer may name: 2^18 blocks of 16 tokens is 4M tokens, far past any context.
pub const MAX_BLOCK_IDS: usize = 1 << 18;
pub const MAX_REQUEST_ID_BYTES: usize = 256;
pub const MAX_TRACE_CONTEXT_BYTES: usize = 512;
pub const MAX_REASON_BYTES: usize = 4096;
/// A header body holding the most of everything; a peer announcing more is refused before reading it.
pub const MAX_HEADER_BODY_BYTES: usize = 2
    + MAX_REQUEST_ID_BYTES
    + 8
    + 4 * 4
    + 1
    + 4 * 2
    + 4
    + 4 * MAX_BLOCK_IDS
    + 2
    + MAX_TRACE_CONTEXT_BYTES;
/// Shape limits: generous for any real model, small enough that products of them cannot overflow.
const MAX_LAYERS: usize = 1 << 12;
const MAX_KV_HEADS: usize = 1 << 12;
const MAX_HEAD_DIM: usize = 1 << 14;
const MAX_BLOCK_SIZE_TOKENS: usize = 1 << 14;
/// A layer chunk's length is a u32 on the wire.
pub const MAX_LAYER_CHUNK_BYTES: usize = u32::MAX as usize;

/// Element type of the KV on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    /// Little-endian f32, the engine's cache type (`KV_LAYOUT.md`).
    F32,
    /// The sender copies the KV (bf16) straight into the destination's device blocks (CUDA: same GPU,
    /// peer GPU or IPC, `KV_TRANSFER.md`) after the header is accepted; layer frames carry no payload and
    /// only order and confirm the copies.
    DevicePush,
}

impl KvDtype {
    pub fn code(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::DevicePush => 1,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(Self::F32),
            1 => Some(Self::DevicePush),
            _ => None,
        }
    }

    pub fn element_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::DevicePush => 2,
        }
    }
}

/// What a sender announces before any KV: whose KV, of which model, in which layout, into which blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferHeader {
    pub request_id: String,
    /// [`super::model_fingerprint`] of the sender's model.
    pub model_fingerprint: u64,
    pub layout: KvLayout,
    pub dtype: KvDtype,
    /// Prompt tokens whose KV the destination holds once the transfer is done.
    pub num_tokens: u32,
    /// Prompt tokens the destination already holds (its cached prefix, whole blocks): the transfer carries
    /// tokens `from_token..num_tokens`.
    pub from_token: u32,
    /// Destination blocks for tokens `from_token..num_tokens`, in token order.
    pub block_ids: Vec<BlockId>,
    /// W3C `traceparent` of the request's trace, or empty.
    pub trace_context: String,
}

impl TransferHeader {
    /// Bytes of one layer in one block.
    pub fn layer_block_bytes(&self) -> usize {
        2 * self.layout.num_kv_heads
            * self.layout.block_size_tokens
            * self.layout.head_dim
            * self.dtype.element_bytes()
    }

    /// Bytes of each layer's chunk: that layer's part of every destination block (none for a device push,
    /// whose KV does not travel in the frames).
    pub fn layer_chunk_bytes(&self) -> usize {
        match self.dtype {
            KvDtype::DevicePush => 0,
            KvDtype::F32 => self.block_ids.len() * self.layer_block_bytes(),
        }
    }

    /// KV bytes of the whole transfer (frames and checksums not counted).
    pub fn kv_bytes(&self) -> u64 {
        self.layer_chunk_bytes() as u64 * self.layout.num_layers as u64
    }

    /// Checks the fields against each other and the limits; what both the encoder and the parser require.
    pub fn validate(&self) -> Result<(), String> {
        let layout = &self.layout;
        let bounded = [
            ("num_layers", layout.num_layers, MAX_LAYERS),
            ("num_kv_heads", layout.num_kv_heads, MAX_KV_HEADS),
            ("head_dim", layout.head_dim, MAX_HEAD_DIM),
            (
                "block_size_tokens",
                layout.block_size_tokens,
                MAX_BLOCK_SIZE_TOKENS,
            ),
            ("block ids", self.block_ids.len(), MAX_BLOCK_IDS),
        ];
        for (name, value, max) in bounded {
            if value == 0 || value > max {
                return Err(format!("{name} is {value}; expected 1..={max}"));
            }
        }
        if self.request_id.is_empty() || self.request_id.len() > MAX_REQUEST_ID_BYTES {
            return Err(format!(
                "request id of {} bytes; expected 1..={MAX_REQUEST_ID_BYTES}",
                self.request_id.len()
            ));
        }
        if self.trace_context.len() > MAX_TRACE_CONTEXT_BYTES {
            return Err(format!(
                "trace context of {} bytes; at most {MAX_TRACE_CONTEXT_BYTES}",
                self.trace_context.len()
            ));
        }
        let (from, to) = (self.from_token as usize, self.num_tokens as usize);
        let block_size = layout.block_size_tokens;
        if from >= to || !from.is_multiple_of(block_size) {
            return Err(format!(
                "tokens {from}..{to}: the range must be non-empty and start on a block boundary ({block_size} tokens)"
            ));
        }
        let blocks_needed = to.div_ceil(block_size) - from / block_size;
        if blocks_needed != self.block_ids.len() {
            return Err(format!(
                "tokens {from}..{to} fill {blocks_needed} blocks of {block_size}, but {} block ids were given",
                self.block_ids.len()
            ));
        }
        if self.layer_chunk_bytes() > MAX_LAYER_CHUNK_BYTES {
            return Err(format!(
                "a layer chunk of {} bytes exceeds the frame limit of {MAX_LAYER_CHUNK_BYTES}",
                self.layer_chunk_bytes()
            ));
        }
        Ok(())
    }

    /// The header's bytes: prefix, body, crc32 of the body.
    pub fn encode(&self) -> Result<Vec<u8>, TransferError> {
        self.validate().map_err(|detail| TransferError::Malformed {
            context: format!("header of transfer {}", self.request_id),
            detail,
        })?;
        let mut body = BytesMut::with_capacity(64 + self.block_ids.len() * 4);
        body.put_u16_le(self.request_id.len() as u16);
        body.put_slice(self.request_id.as_bytes());
        body.put_u64_le(self.model_fingerprint);
        for field in [
            self.layout.num_layers,
            self.layout.num_kv_heads,
            self.layout.head_dim,
            self.layout.block_size_tokens,
        ] {
            body.put_u32_le(field as u32);
        }
        body.put_u8(self.dtype.code());
        body.put_u32_le(self.num_tokens);
        body.put_u32_le(self.from_token);
        body.put_u32_le(self.block_ids.len() as u32);
        for &block in &self.block_ids {
            body.put_u32_le(block);
        }
        body.put_u16_le(self.trace_context.len() as u16);
        body.put_slice(self.trace_context.as_bytes());

        let mut out = Vec::with_capacity(HEADER_PREFIX_BYTES + body.len() + 4);
        out.extend_from_slice(HEADER_MAGIC);
        out.extend_from_slice(&WIRE_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        Ok(out)
    }
}

/// Parses the fixed prefix of a header; returns the body length to read next (the body, then a crc32).
pub fn parse_header_prefix(prefix: &[u8; HEADER_PREFIX_BYTES]) -> Result<usize, TransferError> {
    if &prefix[..8] != HEADER_MAGIC {
        return Err(malformed("header", "not a tandem KV transfer (bad magic)"));
    }
    let version = u16::from_le_bytes([prefix[8], prefix[9]]);
    if version != WIRE_VERSION {
        return Err(TransferError::UnsupportedVersion {
            found: version,
            supported: WIRE_VERSION,
        });
    }
    let body_len = u32::from_le_bytes([prefix[10], prefix[11], prefix[12], prefix[13]]) as usize;
    if body_len > MAX_HEADER_BODY_BYTES {
        return Err(malformed(
            "header",
            format!("body of {body_len} bytes exceeds the limit of {MAX_HEADER_BODY_BYTES}"),
        ));
    }
    Ok(body_len)
}

/// Parses a header body followed by its crc32 (`body_len + 4` bytes, `body_len` from
/// [`parse_header_prefix`]).
pub fn parse_header_body(body_and_crc: &[u8]) -> Result<TransferHeader, TransferError> {
    let Some(body_len) = body_and_crc.len().checked_sub(4) else {
        return Err(malformed("header", "shorter than its checksum"));
    };
    let (body, crc) = body_and_crc.split_at(body_len);
    let mut crc_reader = Reader::new(crc);
    if crc_reader.u32()? != crc32fast::hash(body) {
        return Err(malformed("header", "checksum mismatch"));
    }
    let mut reader = Reader::new(body);
    let request_id = reader.string(MAX_REQUEST_ID_BYTES, "request id")?;
    let model_fingerprint = reader.u64()?;
    let mut shape = [0usize; 4];
    for field in &mut shape {
        *field = reader.u32()? as usize;
    }
    let dtype_code = reader.u8()?;
    let dtype = KvDtype::from_code(dtype_code).ok_or_else(|| {
        malformed(
            "header",
            format!("unknown dtype code {dtype_code} (0 = f32, 1 = device push)"),
        )
    })?;
    let num_tokens = reader.u32()?;
    let from_token = reader.u32()?;
    let num_block_ids = reader.u32()? as usize;
    if num_block_ids > MAX_BLOCK_IDS || num_block_ids * 4 > reader.remaining() {
        return Err(malformed(
            "header",
            format!("{num_block_ids} block ids announced, the body cannot hold them"),
        ));
    }
    let mut block_ids = Vec::with_capacity(num_block_ids);
    for _ in 0..num_block_ids {
        block_ids.push(reader.u32()?);
    }
    let trace_context = reader.string(MAX_TRACE_CONTEXT_BYTES, "trace context")?;
    if reader.remaining() != 0 {
        return Err(malformed(
            "header",
            format!("{} unexpected bytes after the body", reader.remaining()),
        ));
    }
    let header = TransferHeader {
        request_id,
        model_fingerprint,
        layout: KvLayout {
            num_layers: shape[0],
            num_kv_heads: shape[1],
            head_dim: shape[2],
            block_size_tokens: shape[3],
        },
        dtype,
        num_tokens,
        from_token,
        block_ids,
        trace_context,
    };
    header
        .validate()
        .map_err(|detail| malformed(format!("header of transfer {}", header.request_id), detail))?;
    Ok(header)
}

/// The fixed part of a frame: which layer (or [`END_FRAME_LAYER`]) and how many payload bytes follow.
pub fn encode_frame_prefix(layer: u32, len: u32) -> [u8; FRAME_PREFIX_BYTES] {
    let mut prefix = [0u8; FRAME_PREFIX_BYTES];
    prefix[..4].copy_from_slice(&layer.to_le_bytes());
    prefix[4..].copy_from_slice(&len.to_le_bytes());
    prefix
}

pub fn parse_frame_prefix(prefix: &[u8; FRAME_PREFIX_BYTES]) -> (u32, u32) {
    (
        u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]),
        u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]),
    )
}

/// The end frame's payload: the first token the prefill side sampled, if it sends one.
pub fn encode_end_payload(first_token_id: Option<u32>) -> [u8; END_FRAME_PAYLOAD_BYTES] {
    let mut payload = [0u8; END_FRAME_PAYLOAD_BYTES];
    if let Some(token) = first_token_id {
        payload[0] = 1;
        payload[1..].copy_from_slice(&token.to_le_bytes());
    }
    payload
}

pub fn parse_end_payload(
    payload: &[u8; END_FRAME_PAYLOAD_BYTES],
) -> Result<Option<u32>, TransferError> {
    let token = u32::from_le_bytes([payload[1], payload[2], payload[3], payload[4]]);
    match payload[0] {
        0 if token == 0 => Ok(None),
        1 => Ok(Some(token)),
        flag => Err(malformed(
            "end frame",
            format!("first-token flag {flag} with token {token}"),
        )),
    }
}

/// A receiver's answer: to the header (go on or not) and to the end frame (delivered or not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Refused { code: RefusalCode, reason: String },
}

impl Reply {
    /// A refusal whose reason is `error`'s message, cut to [`MAX_REASON_BYTES`] on a character boundary.
    pub fn refusal(error: &TransferError) -> Self {
        let mut reason = match error {
            // Already a refusal's copy: pass its reason on as it is.
            TransferError::Refused { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        if reason.len() > MAX_REASON_BYTES {
            let mut end = MAX_REASON_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Self::Refused {
            code: error.refusal_code(),
            reason,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let (code, reason) = match self {
            Self::Ok => (0u8, ""),
            Self::Refused { code, reason } => (code.as_u8(), reason.as_str()),
        };
        let reason = &reason.as_bytes()[..reason.len().min(MAX_REASON_BYTES)];
        let mut out = Vec::with_capacity(REPLY_PREFIX_BYTES + reason.len());
        out.extend_from_slice(REPLY_MAGIC);
        out.push(code);
        out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
        out.extend_from_slice(reason);
        out
    }
}

/// Parses a reply's fixed prefix; returns the code and the reason length to read next.
pub fn parse_reply_prefix(prefix: &[u8; REPLY_PREFIX_BYTES]) -> Result<(u8, usize), TransferError> {
    if &prefix[..8] != REPLY_MAGIC {
        return Err(malformed(
            "reply",
            "not a tandem KV transfer reply (bad magic)",
        ));
    }
    let reason_len = u16::from_le_bytes([prefix[9], prefix[10]]) as usize;
    if reason_len > MAX_REASON_BYTES {
        return Err(malformed(
            "reply",
            format!("reason of {reason_len} bytes exceeds {MAX_REASON_BYTES}"),
        ));
    }
    Ok((prefix[8], reason_len))
}

pub fn parse_reply(code: u8, reason: &[u8]) -> Reply {
    match code {
        0 => Reply::Ok,
        code => Reply::Refused {
            code: RefusalCode::from_u8(code),
            reason: String::from_utf8_lossy(reason).into_owned(),
        },
    }
}

fn malformed(context: impl Into<String>, detail: impl Into<String>) -> TransferError {
    TransferError::Malformed {
        context: context.into(),
        detail: detail.into(),
    }
}

/// A cursor over untrusted bytes whose every read checks the length first.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn remaining(&self) -> usize {
        self.bytes.len()
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], TransferError> {
        if len > self.bytes.len() {
            return Err(malformed(
                "header",
                format!("truncated: {len} bytes needed, {} left", self.bytes.len()),
            ));
        }
        let (taken, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, TransferError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, TransferError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, TransferError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, TransferError> {
        let b = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(b);
        Ok(u64::from_le_bytes(array))
    }

    fn string(&mut self, max_bytes: usize, what: &str) -> Result<String, TransferError> {
        let len = self.u16()? as usize;
        if len > max_bytes {
            return Err(malformed(
                "header",
                format!("{what} of {len} bytes exceeds {max_bytes}"),
            ));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| malformed("header", format!("{what} is not UTF-8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> TransferHeader {
        TransferHeader {
            request_id: "01JREQUEST".into(),
            model_fingerprint: 0xDEAD_BEEF_1234_5678,
            layout: KvLayout {
                num_layers: 3,
                num_kv_heads: 2,
                head_dim: 8,
                block_size_tokens: 4,
            },
            dtype: KvDtype::F32,
            num_tokens: 11,
            from_token: 4,
            block_ids: vec![7, 9],
            trace_context: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        }
    }

    fn parse(bytes: &[u8]) -> Result<TransferHeader, TransferError> {
        let prefix: &[u8; HEADER_PREFIX_BYTES] = bytes
            .get(..HEADER_PREFIX_BYTES)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| malformed("header", "short prefix"))?;
        let body_len = parse_header_prefix(prefix)?;
        let rest = &bytes[HEADER_PREFIX_BYTES..];
        if rest.len() != body_len + 4 {
            return Err(malformed("header", "length"));
        }
        parse_header_body(rest)
    }

    #[test]
    fn header_round_trips() {
        let bytes = header().encode().unwrap();
        assert_eq!(parse(&bytes).unwrap(), header());
        assert_eq!(header().layer_chunk_bytes(), 2 * (2 * 2 * 4 * 8 * 4));
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_an_error_not_a_panic() {
        let bytes = header().encode().unwrap();
        for len in 0..bytes.len() {
            assert!(parse(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for index in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[index] ^= 1 << bit;
                // The crc catches every body flip; prefix flips change magic, version or length.
                assert!(parse(&flipped).is_err(), "bit {bit} of byte {index}");
            }
        }
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocating() {
        let mut prefix = [0u8; HEADER_PREFIX_BYTES];
        prefix[..8].copy_from_slice(HEADER_MAGIC);
        prefix[8..10].copy_from_slice(&WIRE_VERSION.to_le_bytes());
        prefix[10..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_header_prefix(&prefix).is_err());
        prefix[8..10].copy_from_slice(&7u16.to_le_bytes());
        assert!(matches!(
            parse_header_prefix(&prefix),
            Err(TransferError::UnsupportedVersion { found: 7, .. })
        ));

        // A body with a valid crc that announces 2^32-1 block ids.
        let mut body = Vec::new();
        body.extend_from_slice(&1u16.to_le_bytes());
        body.push(b'r');
        body.extend_from_slice(&0u64.to_le_bytes());
        for _ in 0..4 {
            body.extend_from_slice(&1u32.to_le_bytes());
        }
        body.push(0);
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        let crc = crc32fast::hash(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        let error = parse_header_body(&body).unwrap_err().to_string();
        assert!(error.contains("block ids announced"), "{error}");
    }

    #[test]
    fn inconsistent_headers_are_refused() {
        let misaligned = TransferHeader {
            from_token: 3,
            ..header()
        };
        assert!(misaligned.encode().is_err());
        let short = TransferHeader {
            block_ids: vec![1],
            ..header()
        };
        assert!(
            short
                .encode()
                .unwrap_err()
                .to_string()
                .contains("fill 2 blocks")
        );
    }

    #[test]
    fn replies_and_end_frames_round_trip() {
        for reply in [
            Reply::Ok,
            Reply::Refused {
                code: RefusalCode::LayoutMismatch,
                reason: "layout differs".into(),
            },
        ] {
            let bytes = reply.encode();
            let prefix: &[u8; REPLY_PREFIX_BYTES] = bytes[..REPLY_PREFIX_BYTES].try_into().unwrap();
            let (code, len) = parse_reply_prefix(prefix).unwrap();
            assert_eq!(
                parse_reply(code, &bytes[REPLY_PREFIX_BYTES..][..len]),
                reply
            );
        }
        assert_eq!(
            parse_end_payload(&encode_end_payload(Some(42))).unwrap(),
            Some(42)
        );
        assert_eq!(parse_end_payload(&encode_end_payload(None)).unwrap(), None);
        assert!(parse_end_payload(&[2, 0, 0, 0, 0]).is_err());
        assert_eq!(parse_frame_prefix(&encode_frame_prefix(3, 99)), (3, 99));
    }
}
