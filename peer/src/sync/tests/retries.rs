//! Retries: backoff with jitter from the seed, deferred batches, and deadlines that survive the
//! device clock jumping back.

use super::*;

#[test]
fn a_clock_jumping_back_days_does_not_hold_up_reconnecting_or_retrying() {
    let mut f = enrolled(16);
    patients(&mut f, 2);
    let mut m = SyncMachine::default();
    let first = connect(&mut m, &mut f, 10);
    let (batch, ids) = push_of(&first);
    m.handle(
        &mut f.dev,
        SyncInput::Message(RelayMessage::PushDeferred {
            batch_id: batch,
            retry_after_ms: 5_000,
            reason: "busy".into(),
        }),
    )
    .unwrap();
    m.handle(&mut f.dev, SyncInput::Disconnected).unwrap();
    assert!(!m.should_connect(&f.dev), "a fresh backoff is respected");
    // The device's clock is set back three days: deadlines set before now lie days ahead.
    let back = T0 - 3 * 24 * 3_600_000;
    f.time.set(back);
    assert!(
        m.should_connect(&f.dev),
        "waiting for the clock to catch up would take days"
    );
    assert_eq!(m.reconnect_in(&f.dev), Some(0));
    let again = connect(&mut m, &mut f, 10);
    assert_eq!(push_of(&again).1, ids, "the deferred batch goes out again at once");
}

#[test]
fn backoff_grows_is_jittered_and_reproducible_from_the_seed() {
    fn delays(seed: u64) -> Vec<u64> {
        let mut f = Fixture::new(seed);
        let mut m = SyncMachine::default();
        let mut out = Vec::new();
        for _ in 0..10 {
            let now = f.time.now_ms();
            m.handle(&mut f.dev, SyncInput::Connected).unwrap();
            m.handle(&mut f.dev, SyncInput::Disconnected).unwrap();
            let at = m.reconnect_at().unwrap().ms();
            out.push(at - now);
            f.time.set(at);
        }
        out
    }
    let a = delays(11);
    let b = delays(11);
    let c = delays(12);
    assert_eq!(a, b, "same seed, same delays");
    assert_ne!(a, c, "another seed, other delays");
    let backoff = Backoff::default();
    for (n, d) in a.iter().enumerate() {
        assert!(*d <= backoff.ceiling(n as u32), "attempt {n}: {d}");
    }
    // Jittered: not simply the ceilings; growing: the later half waits longer in total.
    assert_ne!(a, (0..10).map(|n| backoff.ceiling(n)).collect::<Vec<_>>());
    assert!(a[5..].iter().sum::<u64>() > a[..5].iter().sum::<u64>(), "{a:?}");
}

#[test]
fn a_deferred_batch_waits_then_goes_again_with_the_same_ids() {
    let mut f = enrolled(13);
    patients(&mut f, 2);
    let mut m = SyncMachine::default();
    let (batch, ids) = push_of(&connect(&mut m, &mut f, 10));
    let deferred = RelayMessage::PushDeferred {
        batch_id: batch,
        retry_after_ms: 2_000,
        reason: "overloaded".into(),
    };
    let out = m.handle(&mut f.dev, SyncInput::Message(deferred)).unwrap();
    assert!(matches!(out[..], [ClientMessage::Pull { .. }]), "{out:?}");
    let due = f.dev.queue(false).unwrap()[0].next_attempt_ms;
    assert!(due >= T0 + 2_000);
    assert_eq!(m.next_wakeup().map(Deadline::ms), Some(due).min(Some(T0 + 30_000)));
    assert!(
        {
            f.time.set(due - 1);
            m.handle(&mut f.dev, SyncInput::Tick)
        }
        .unwrap()
        .is_empty()
    );
    let (_, again) = push_of(
        &{
            f.time.set(due);
            m.handle(&mut f.dev, SyncInput::Tick)
        }
        .unwrap(),
    );
    assert_eq!(again, ids);
    // Unanswered for too long: the machine gives up the connection.
    assert!(matches!(
        {
            f.time.set(due + 30_000);
            m.handle(&mut f.dev, SyncInput::Tick)
        },
        Err(SyncError::Timeout)
    ));
}
