//! The request-lifecycle state machine: every legal order, and illegal ones rejected with the right reason.

use tandem_events::lifecycle::{
    Applied, RequestLifecycle, RequestState, ViolationReason, check_sequence,
};
use tandem_events::schema::*;

fn received() -> Body {
    Body::Received(Received {
        model: "qwen3".into(),
        prompt_token_ids: vec![1, 2, 3],
        prompt_tokens: 3,
        ..Default::default()
    })
}
fn routed(worker: &str, attempt: u32) -> Body {
    Body::Routed(Routed {
        decode_worker_id: worker.into(),
        attempt,
        ..Default::default()
    })
}
fn local() -> Body {
    Body::PrefillLocal(PrefillLocal::default())
}
fn local_on(worker: &str) -> Body {
    Body::PrefillLocal(PrefillLocal {
        decode_worker_id: worker.into(),
        decision: None,
    })
}
fn queued() -> Body {
    Body::PrefillQueued(PrefillQueued::default())
}
fn started(attempt: u32) -> Body {
    Body::PrefillStarted(PrefillStarted {
        prefill_worker_id: "prefill-1".into(),
        delivery_attempt: attempt,
    })
}
fn done() -> Body {
    Body::PrefillDone(PrefillDone {
        first_token_id: 42,
        ..Default::default()
    })
}
fn transferred() -> Body {
    Body::KvTransferred(KvTransferred {
        bytes: 4096,
        blocks: 1,
        ..Default::default()
    })
}
fn decode_started() -> Body {
    Body::DecodeStarted(DecodeStarted {
        decode_worker_id: "decode-1".into(),
    })
}
fn tokens(start_index: u32, token_ids: &[u32]) -> Body {
    Body::TokensDecoded(TokensDecoded {
        start_index,
        token_ids: token_ids.to_vec(),
        ..Default::default()
    })
}
fn migrated(tokens_generated: u32) -> Body {
    Body::Migrated(Migrated {
        from_worker_id: "decode-1".into(),
        reason: "worker_lost".into(),
        tokens_generated,
    })
}
fn completed() -> Body {
    Body::Completed(Completed {
        finish_reason: "length".into(),
        ..Default::default()
    })
}
fn failed() -> Body {
    Body::Failed(Failed {
        reason: "engine_error".into(),
        ..Default::default()
    })
}
fn cancelled() -> Body {
    Body::Cancelled(Cancelled {
        reason: "client_disconnected".into(),
    })
}

fn final_state(bodies: &[Body]) -> RequestState {
    check_sequence(bodies).unwrap_or_else(|(index, violation)| panic!("event {index}: {violation}"))
}

fn violation(bodies: &[Body]) -> (usize, ViolationReason) {
    let (index, violation) = check_sequence(bodies).expect_err("must be rejected");
    (index, violation.reason)
}

#[test]
fn local_prefill_path() {
    let path = [
        received(),
        routed("decode-1", 1),
        local(),
        decode_started(),
        tokens(0, &[5, 6]),
        tokens(2, &[7]),
        completed(),
    ];
    assert_eq!(final_state(&path), RequestState::Completed);
}

#[test]
fn remote_prefill_path_with_redelivery() {
    let path = [
        received(),
        routed("decode-1", 1),
        queued(),
        started(1),
        started(2),
        done(),
        transferred(),
        decode_started(),
        tokens(0, &[5]),
        completed(),
    ];
    assert_eq!(final_state(&path), RequestState::Completed);
}

#[test]
fn remote_prefill_records_may_trail_the_decode_start() {
    // The KV arrived before the prefill worker appended its records.
    let early_decode = [
        received(),
        routed("decode-1", 1),
        queued(),
        started(1),
        decode_started(),
        tokens(0, &[5]),
        done(),
        transferred(),
        completed(),
    ];
    assert_eq!(final_state(&early_decode), RequestState::Completed);
    let records_after_completion = [
        received(),
        routed("decode-1", 1),
        queued(),
        started(1),
        done(),
        decode_started(),
        completed(),
        transferred(),
    ];
    assert_eq!(
        final_state(&records_after_completion),
        RequestState::Completed
    );
    // But not on the local path, not before any prefill worker started, and not twice or out of order.
    assert_eq!(
        violation(&[
            received(),
            routed("d", 1),
            local(),
            decode_started(),
            done()
        ]),
        (4, ViolationReason::OutOfOrder)
    );
    assert_eq!(
        violation(&[received(), routed("d", 1), queued(), decode_started()]),
        (3, ViolationReason::OutOfOrder)
    );
    assert_eq!(
        violation(&[
            received(),
            routed("d", 1),
            queued(),
            started(1),
            decode_started(),
            transferred()
        ]),
        (5, ViolationReason::OutOfOrder)
    );
}

#[test]
fn every_live_state_can_fail_or_be_cancelled() {
    let prefixes: Vec<Vec<Body>> = vec![
        vec![received()],
        vec![received(), routed("d", 1)],
        vec![received(), routed("d", 1), local()],
        vec![received(), routed("d", 1), queued()],
        vec![received(), routed("d", 1), queued(), started(1)],
        vec![received(), routed("d", 1), queued(), started(1), done()],
        vec![
            received(),
            routed("d", 1),
            queued(),
            started(1),
            done(),
            transferred(),
        ],
        vec![
            received(),
            routed("d", 1),
            local(),
            decode_started(),
            tokens(0, &[1]),
        ],
        vec![received(), routed("d", 1), local(), migrated(0)],
    ];
    for prefix in prefixes {
        for (ending, expected) in [
            (failed(), RequestState::Failed),
            (cancelled(), RequestState::Cancelled),
        ] {
            let mut path = prefix.clone();
            path.push(ending);
            assert_eq!(final_state(&path), expected, "{path:?}");
        }
    }
}

#[test]
fn migration_reroutes_and_continues_after_the_checkpoint() {
    let path = [
        received(),
        routed("decode-1", 1),
        local(),
        decode_started(),
        tokens(0, &[5, 6, 7]),
        migrated(3),
        routed("decode-2", 2),
        local(),
        decode_started(),
        tokens(3, &[8]),
        completed(),
    ];
    assert_eq!(final_state(&path), RequestState::Completed);
    // Migration is possible from every state between routing and decoding.
    for prefix in [
        vec![received(), routed("d", 1)],
        vec![received(), routed("d", 1), queued(), started(1)],
        vec![
            received(),
            routed("d", 1),
            queued(),
            started(1),
            done(),
            transferred(),
        ],
    ] {
        let mut path = prefix;
        path.push(migrated(0));
        assert_eq!(final_state(&path), RequestState::Migrating);
    }
}

#[test]
fn idempotent_repeats_are_accepted_even_after_the_end() {
    let mut lifecycle = RequestLifecycle::default();
    for body in [
        received(),
        routed("d", 1),
        local(),
        decode_started(),
        tokens(0, &[1, 2]),
    ] {
        assert!(matches!(lifecycle.apply(&body), Ok(Applied::Advanced(_))));
    }
    assert_eq!(lifecycle.apply(&tokens(0, &[1, 2])), Ok(Applied::Repeat));
    assert_eq!(lifecycle.apply(&routed("d", 1)), Ok(Applied::Repeat));
    assert_eq!(lifecycle.tokens_checkpointed(), 2);
    assert_eq!(
        lifecycle.apply(&completed()),
        Ok(Applied::Advanced(RequestState::Completed))
    );
    assert_eq!(lifecycle.apply(&completed()), Ok(Applied::Repeat));
    assert_eq!(lifecycle.apply(&tokens(0, &[1, 2])), Ok(Applied::Repeat));
    assert_eq!(lifecycle.state(), RequestState::Completed);
}

#[test]
fn prefill_done_needs_prefill_queued_and_started() {
    assert_eq!(
        violation(&[received(), routed("d", 1), done()]),
        (2, ViolationReason::OutOfOrder)
    );
    assert_eq!(
        violation(&[received(), routed("d", 1), queued(), done()]),
        (3, ViolationReason::OutOfOrder)
    );
    assert_eq!(
        violation(&[received(), routed("d", 1), local(), started(1)]),
        (3, ViolationReason::OutOfOrder)
    );
}

#[test]
fn first_event_must_be_received() {
    assert_eq!(
        violation(&[routed("d", 1)]),
        (0, ViolationReason::NotReceivedFirst)
    );
    assert_eq!(
        violation(&[completed()]),
        (0, ViolationReason::NotReceivedFirst)
    );
    assert_eq!(
        violation(&[received(), received_other()]),
        (1, ViolationReason::OutOfOrder)
    );
}

fn received_other() -> Body {
    Body::Received(Received {
        model: "other".into(),
        ..Default::default()
    })
}

#[test]
fn work_in_flight_may_land_after_a_cancellation_but_changes_nothing() {
    let mut lifecycle = RequestLifecycle::default();
    for body in [
        received(),
        routed("d", 1),
        local(),
        decode_started(),
        tokens(0, &[1]),
        cancelled(),
    ] {
        assert!(matches!(lifecycle.apply(&body), Ok(Applied::Advanced(_))));
    }
    assert_eq!(
        lifecycle.apply(&tokens(1, &[2])),
        Ok(Applied::AfterCancellation)
    );
    assert_eq!(
        lifecycle.apply(&completed()),
        Ok(Applied::AfterCancellation)
    );
    assert_eq!(lifecycle.state(), RequestState::Cancelled);
    // Not after a completion, and never a second request start.
    assert_eq!(
        violation(&[received(), cancelled(), received_other()]),
        (2, ViolationReason::AfterTerminal)
    );
    let done = [
        received(),
        routed("d", 1),
        local(),
        decode_started(),
        completed(),
        tokens(0, &[1]),
    ];
    assert_eq!(violation(&done), (5, ViolationReason::AfterTerminal));
}

#[test]
fn nothing_new_after_a_terminal_event() {
    let base = [
        received(),
        routed("d", 1),
        local(),
        decode_started(),
        completed(),
    ];
    let mut after = base.to_vec();
    after.push(tokens(0, &[9]));
    assert_eq!(violation(&after), (5, ViolationReason::AfterTerminal));
    let failed_then_cancelled = [received(), failed(), cancelled()];
    assert_eq!(
        violation(&failed_then_cancelled),
        (2, ViolationReason::AfterTerminal)
    );
}

#[test]
fn token_indices_must_be_contiguous() {
    let base = vec![
        received(),
        routed("d", 1),
        local(),
        decode_started(),
        tokens(0, &[1, 2]),
    ];
    let mut gap = base.clone();
    gap.push(tokens(3, &[4]));
    assert_eq!(
        violation(&gap),
        (
            5,
            ViolationReason::TokenIndexGap {
                expected: 2,
                found: 3
            }
        )
    );
    let mut twice = base.clone();
    twice.push(tokens(1, &[9, 9]));
    assert_eq!(
        violation(&twice),
        (
            5,
            ViolationReason::TokenIndexRepeated {
                expected: 2,
                found: 1
            }
        )
    );
    // Tokens before DecodeStarted are out of order.
    assert_eq!(
        violation(&[received(), routed("d", 1), local(), tokens(0, &[1])]),
        (3, ViolationReason::OutOfOrder)
    );
}

#[test]
fn completion_needs_decoding_and_attempts_must_grow() {
    assert_eq!(
        violation(&[received(), routed("d", 1), local(), completed()]),
        (3, ViolationReason::OutOfOrder)
    );
    assert_eq!(
        violation(&[received(), routed("d", 1), queued(), started(2), started(1)]),
        (
            4,
            ViolationReason::AttemptNotIncreasing {
                previous: 2,
                found: 1
            }
        )
    );
}

#[test]
fn migration_cannot_claim_unsaved_tokens_or_skip_routing() {
    assert_eq!(
        violation(&[
            received(),
            routed("d", 1),
            local(),
            decode_started(),
            tokens(0, &[1]),
            migrated(5)
        ]),
        (
            5,
            ViolationReason::MigratedUncheckpointedTokens {
                claimed: 5,
                checkpointed: 1
            }
        )
    );
    assert_eq!(
        violation(&[received(), migrated(0)]),
        (1, ViolationReason::OutOfOrder)
    );
    assert_eq!(
        violation(&[
            received(),
            routed("d", 1),
            local(),
            migrated(0),
            local_on("d2")
        ]),
        (4, ViolationReason::OutOfOrder)
    );
}

#[test]
fn worker_events_are_not_request_events() {
    let heartbeat = Body::WorkerHeartbeat(WorkerHeartbeat::default());
    assert_eq!(
        violation(&[received(), heartbeat]),
        (1, ViolationReason::NotARequestEvent)
    );
}

#[test]
fn a_violation_leaves_the_lifecycle_unchanged() {
    let mut lifecycle = RequestLifecycle::default();
    lifecycle.apply(&received()).unwrap();
    let before = lifecycle.clone();
    let error = lifecycle.apply(&done()).unwrap_err();
    assert_eq!(error.state, RequestState::Received);
    assert!(error.to_string().contains("prefill_done"));
    assert_eq!(lifecycle, before);
}
