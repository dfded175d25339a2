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
        decode_started_on("decode-2"),
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
    // A cancellation racing the end is late, not a violation: the gateway cannot know the request just ended.
    let failed_then_cancelled = [received(), failed(), cancelled()];
    assert_eq!(final_state(&failed_then_cancelled), RequestState::Failed);
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

fn migrated_from(worker: &str, tokens_generated: u32) -> Body {
    Body::Migrated(Migrated {
        from_worker_id: worker.into(),
        reason: "worker_lost".into(),
        tokens_generated,
    })
}
fn decode_started_on(worker: &str) -> Body {
    Body::DecodeStarted(DecodeStarted {
        decode_worker_id: worker.into(),
    })
}
fn tokens_on(worker: &str, start_index: u32, token_ids: &[u32]) -> Body {
    Body::TokensDecoded(TokensDecoded {
        decode_worker_id: worker.into(),
        start_index,
        token_ids: token_ids.to_vec(),
        ..Default::default()
    })
}
fn completed_on(worker: &str, completion_tokens: u32) -> Body {
    Body::Completed(Completed {
        finish_reason: "length".into(),
        completion_tokens,
        decode_worker_id: worker.into(),
        ..Default::default()
    })
}

#[test]
fn late_work_of_a_migrated_attempt_is_accepted_and_changes_nothing() {
    let mut lifecycle = RequestLifecycle::default();
    for body in [
        received(),
        routed("decode-1", 1),
        local_on("decode-1"),
        decode_started_on("decode-1"),
        tokens_on("decode-1", 0, &[5, 6]),
        migrated_from("decode-1", 2),
    ] {
        assert!(matches!(lifecycle.apply(&body), Ok(Applied::Advanced(_))));
    }
    assert_eq!(lifecycle.migrations(), 1);
    // The old worker was still alive: its next checkpoint lands while the request waits to be routed again.
    assert_eq!(
        lifecycle.apply(&tokens_on("decode-1", 2, &[7])),
        Ok(Applied::AfterMigration)
    );
    assert_eq!(lifecycle.state(), RequestState::Migrating);
    assert_eq!(lifecycle.tokens_checkpointed(), 2);
    for body in [
        routed("decode-2", 2),
        local_on("decode-2"),
        decode_started_on("decode-2"),
    ] {
        assert!(matches!(lifecycle.apply(&body), Ok(Applied::Advanced(_))));
    }
    // More of the old attempt, interleaved with the new one: the new one's checkpoints continue at 2.
    assert_eq!(
        lifecycle.apply(&decode_started_on("decode-1")),
        Ok(Applied::AfterMigration)
    );
    assert_eq!(
        lifecycle.apply(&tokens_on("decode-2", 2, &[9, 9])),
        Ok(Applied::Advanced(RequestState::Decoding))
    );
    assert_eq!(
        lifecycle.apply(&tokens_on("decode-1", 3, &[8])),
        Ok(Applied::AfterMigration)
    );
    assert_eq!(lifecycle.tokens_checkpointed(), 4);
    assert_eq!(
        lifecycle.apply(&completed_on("decode-2", 4)),
        Ok(Applied::Advanced(RequestState::Completed))
    );
    // Even after the end, and even a completion of the old attempt.
    assert_eq!(
        lifecycle.apply(&completed_on("decode-1", 3)),
        Ok(Applied::AfterMigration)
    );
    assert_eq!(lifecycle.state(), RequestState::Completed);
    // A prefill worker's record of the old attempt names no decode worker: late when it cannot follow.
    let mut remote = RequestLifecycle::default();
    for body in [
        received(),
        routed("decode-1", 1),
        queued(),
        started(1),
        migrated_from("decode-1", 0),
        routed("decode-2", 2),
        local_on("decode-2"),
    ] {
        assert!(matches!(remote.apply(&body), Ok(Applied::Advanced(_))));
    }
    assert_eq!(remote.apply(&done()), Ok(Applied::AfterMigration));
    assert_eq!(remote.state(), RequestState::PrefillLocal);
}

#[test]
fn a_request_can_migrate_twice_and_back_to_a_worker_it_left() {
    let path = [
        received(),
        routed("decode-1", 1),
        local_on("decode-1"),
        decode_started_on("decode-1"),
        tokens_on("decode-1", 0, &[1]),
        migrated_from("decode-1", 1),
        routed("decode-2", 2),
        local_on("decode-2"),
        decode_started_on("decode-2"),
        tokens_on("decode-2", 1, &[2]),
        migrated_from("decode-2", 2),
        // decode-1 came back and takes it again: its events count once more.
        routed("decode-1", 3),
        local_on("decode-1"),
        decode_started_on("decode-1"),
        tokens_on("decode-2", 2, &[7]),
        tokens_on("decode-1", 2, &[3]),
        completed_on("decode-1", 3),
    ];
    assert_eq!(final_state(&path), RequestState::Completed);
    // A current worker's gap is still a violation after migrations.
    assert_eq!(
        violation(&[
            received(),
            routed("decode-1", 1),
            local_on("decode-1"),
            decode_started_on("decode-1"),
            tokens_on("decode-1", 0, &[1]),
            migrated_from("decode-1", 1),
            routed("decode-2", 2),
            local_on("decode-2"),
            decode_started_on("decode-2"),
            tokens_on("decode-2", 3, &[2]),
        ]),
        (
            9,
            ViolationReason::TokenIndexGap {
                expected: 1,
                found: 3
            }
        )
    );
}

#[test]
fn the_scheduler_can_fail_a_request_in_any_live_state_even_naming_a_lost_worker() {
    let scheduler_failed = Body::Failed(Failed {
        reason: "prefill_timeout".into(),
        message: "no PrefillDone within 30 s".into(),
        worker_id: "decode-1".into(),
    });
    for prefix in [
        vec![received()],
        vec![received(), routed("decode-1", 1)],
        vec![received(), routed("decode-1", 1), queued(), started(1)],
        vec![
            received(),
            routed("decode-1", 1),
            local_on("decode-1"),
            migrated_from("decode-1", 0),
        ],
        vec![
            received(),
            routed("decode-1", 1),
            local_on("decode-1"),
            migrated_from("decode-1", 0),
            routed("decode-2", 2),
        ],
    ] {
        let mut path = prefix;
        path.push(scheduler_failed.clone());
        assert_eq!(final_state(&path), RequestState::Failed);
    }
}

#[test]
fn a_cancellation_racing_the_end_lands_late_and_changes_nothing() {
    let path = [
        received(),
        routed("decode-1", 1),
        local(),
        decode_started(),
        tokens(0, &[5, 6]),
        completed(),
        cancelled(),
    ];
    assert_eq!(final_state(&path), RequestState::Completed);
    let mut lifecycle = tandem_events::lifecycle::RequestLifecycle::default();
    for body in &path[..6] {
        lifecycle.apply(body).unwrap();
    }
    assert_eq!(
        lifecycle.apply(&cancelled()),
        Ok(tandem_events::lifecycle::Applied::LateCancellation)
    );
    // Other work after the end is still a violation.
    assert_eq!(
        violation(&[
            received(),
            routed("decode-1", 1),
            local(),
            decode_started(),
            completed(),
            tokens(0, &[5])
        ])
        .1,
        ViolationReason::AfterTerminal
    );
}
