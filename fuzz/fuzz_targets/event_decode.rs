//! Any bytes given to the event decoder (what a log hands every consumer) give an event or a `DecodeError`, and
//! any bytes on a token subject a `TokenUpdate` or an error:
//! never a panic, and (with `-malloc_limit_mb`) never an allocation out of proportion to the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tandem_events::Event;
use tandem_events::tokens::TokenUpdate;

fuzz_target!(|payload: &[u8]| {
    if let Ok(event) = Event::decode(payload) {
        // A decoded event re-encodes to bytes that decode to the same event (compared as bytes: a NaN
        // temperature is not equal to itself).
        let encoded = event.encode();
        let again = Event::decode(&encoded).expect("a re-encoded event decodes");
        assert_eq!(again.encode(), encoded);
    }
    // Token updates arrive on NATS core subjects anyone on the server may publish to.
    let _ = TokenUpdate::decode(payload);
});
