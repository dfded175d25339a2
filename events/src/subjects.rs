//! Subject names of the log (DESIGN.md §3) and NATS wildcard matching, shared by both log backends.

use crate::event::EventKind;

/// The JetStream stream (and the embedded log's name for the same thing).
pub const STREAM_NAME: &str = "TANDEM";
/// Every event subject starts with this.
pub const EVENT_PREFIX: &str = "tandem.ev";
/// Filter that matches every event.
pub const ALL_EVENTS: &str = "tandem.ev.>";
/// The key-value bucket where workers keep their heartbeats (key: worker id, value: role, `decode` or `prefill`).
pub const WORKERS_BUCKET: &str = "tandem-workers";
/// The key-value bucket of settings changeable at run time (no expiry), e.g. `max_local_prefill_tokens`.
pub const SETTINGS_BUCKET: &str = "tandem-settings";
/// A worker whose last heartbeat is older than this is gone from the bucket.
pub const WORKER_HEARTBEAT_TTL: std::time::Duration = std::time::Duration::from_secs(4);

/// Why an id cannot be used as a subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "id {id:?} cannot be a subject token: ids must be non-empty and free of '.', '*', '>' and whitespace"
)]
pub struct InvalidSubjectToken {
    pub id: String,
}

/// Checks that `token` is a single NATS subject token.
pub fn check_token(token: &str) -> Result<(), InvalidSubjectToken> {
    let bad = token.is_empty()
        || token
            .chars()
            .any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace());
    if bad {
        Err(InvalidSubjectToken {
            id: token.to_string(),
        })
    } else {
        Ok(())
    }
}

/// `tandem.ev.<kind>.<id>`: the subject of an event about request or worker `id`.
pub fn event_subject(kind: EventKind, id: &str) -> Result<String, InvalidSubjectToken> {
    check_token(id)?;
    Ok(format!("{EVENT_PREFIX}.{}.{id}", kind.as_str()))
}

/// Filter for every event of one kind.
pub fn kind_filter(kind: EventKind) -> String {
    format!("{EVENT_PREFIX}.{}.>", kind.as_str())
}

/// Filter for the `Routed` events addressed to one decode worker (it consumes only its own).
pub fn routed_to(decode_worker_id: &str) -> Result<String, InvalidSubjectToken> {
    event_subject(EventKind::Routed, decode_worker_id)
}

/// NATS core subject on which a request's tokens stream to the gateway (not persisted).
pub fn token_subject(request_id: &str) -> Result<String, InvalidSubjectToken> {
    check_token(request_id)?;
    Ok(format!("tandem.tok.{request_id}"))
}

/// The dedup id of an append: `<id>:<kind>:<n>`, where `n` tells apart legitimate repeats of one kind
/// (the n-th checkpoint, the n-th delivery attempt); a retried append reuses its `n` and is dropped as a duplicate.
pub fn dedup_id(id: &str, kind: EventKind, occurrence: u32) -> String {
    format!("{id}:{}:{occurrence}", kind.as_str())
}

/// NATS subject matching: tokens split on '.', `*` matches one token, `>` (last) matches one or more.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut filter_tokens = filter.split('.');
    let mut subject_tokens = subject.split('.');
    loop {
        match (filter_tokens.next(), subject_tokens.next()) {
            (Some(">"), Some(_)) => return filter_tokens.next().is_none(),
            (Some("*"), Some(_)) => {}
            (Some(f), Some(s)) if f == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when `subject` matches any of `filters`; an empty filter list matches everything.
pub fn matches_any(filters: &[String], subject: &str) -> bool {
    filters.is_empty() || filters.iter().any(|f| subject_matches(f, subject))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_follow_nats_rules() {
        assert!(subject_matches("tandem.ev.>", "tandem.ev.routed.w1"));
        assert!(!subject_matches("tandem.ev.>", "tandem.ev"));
        assert!(subject_matches("tandem.ev.*.w1", "tandem.ev.routed.w1"));
        assert!(!subject_matches("tandem.ev.*.w1", "tandem.ev.routed.w2"));
        assert!(!subject_matches("tandem.ev.*", "tandem.ev.routed.w1"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(!subject_matches("a.b.c", "a.b"));
    }

    #[test]
    fn ids_with_subject_syntax_are_refused() {
        assert!(event_subject(EventKind::Received, "01J0ABC").is_ok());
        for bad in ["", "a.b", "a*", "a>", "a b"] {
            assert!(event_subject(EventKind::Received, bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            routed_to("decode-1").unwrap(),
            "tandem.ev.routed.decode-1".to_string()
        );
    }
}
