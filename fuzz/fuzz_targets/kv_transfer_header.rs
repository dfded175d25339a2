//! Any bytes where a KV transfer header is expected (what a decode worker's receiver reads from any peer): the
//! prefix and the body parse to a header or a `TransferError`, never a panic, and a parsed header's sizes are
//! computed without overflow. Reply and end-frame parsing get the same treatment.
//!
//! The first byte picks what the rest is: 0, the stream as the receiver reads it (prefix, body, crc32); 1, a
//! header body whose crc32 the target appends (a fuzzer cannot forge one, and the fields behind the checksum are
//! what a buggy or hostile sender controls); 2, a reply and an end frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_workers::transfer::wire::{
    END_FRAME_PAYLOAD_BYTES, HEADER_PREFIX_BYTES, REPLY_PREFIX_BYTES, TransferHeader,
    parse_end_payload, parse_header_body, parse_header_prefix, parse_reply, parse_reply_prefix,
};

/// A parsed header must be one the encoder accepts, with the same bytes, and sizes that do not overflow.
fn check(header: &TransferHeader, body_and_crc: &[u8]) {
    let _ = (header.layer_block_bytes(), header.layer_chunk_bytes(), header.kv_bytes());
    let encoded = header.encode().expect("a parsed header encodes");
    assert_eq!(&encoded[HEADER_PREFIX_BYTES..], body_and_crc, "the header round-trips");
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, bytes)) = input.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Some((prefix, rest)) = bytes.split_first_chunk::<HEADER_PREFIX_BYTES>()
                && let Ok(body_len) = parse_header_prefix(prefix)
            {
                let body_and_crc = &rest[..rest.len().min(body_len + 4)];
                if let Ok(header) = parse_header_body(body_and_crc) {
                    check(&header, body_and_crc);
                }
            }
        }
        1 => {
            let mut body_and_crc = bytes.to_vec();
            body_and_crc.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
            if let Ok(header) = parse_header_body(&body_and_crc) {
                check(&header, &body_and_crc);
            }
        }
        _ => {
            if let Some((prefix, rest)) = bytes.split_first_chunk::<REPLY_PREFIX_BYTES>()
                && let Ok((code, reason_len)) = parse_reply_prefix(prefix)
            {
                let _ = parse_reply(code, &rest[..rest.len().min(reason_len)]);
            }
            if let Some(payload) = bytes.last_chunk::<END_FRAME_PAYLOAD_BYTES>() {
                let _ = parse_end_payload(payload);
            }
        }
    }
});
