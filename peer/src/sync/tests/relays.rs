//! Several relays of one cluster: the list a device keeps, and whose refusal is final.

use super::*;
use crate::PeerError;

fn refuse(m: &mut SyncMachine, f: &mut Fixture) -> SyncError {
    m.handle(&mut f.dev, SyncInput::Connected).unwrap();
    m.handle(
        &mut f.dev,
        SyncInput::Message(RelayMessage::AuthFailed {
            reason: AuthFailure::UnknownDevice,
            message: "device is not enrolled".into(),
        }),
    )
    .unwrap_err()
}

#[test]
fn a_refusal_from_another_address_before_the_challenge_is_not_final_the_first_relays_is() {
    let mut f = enrolled(40);
    let mut m = SyncMachine::default();
    // Another relay of the list (maybe of another cluster, listed by mistake) says "unknown".
    m.set_on_other_relay(true);
    let err = refuse(&mut m, &mut f);
    assert!(err.to_string().contains("trying the next"), "{err}");
    assert_ne!(m.phase(), Phase::AuthFailed);
    m.handle(&mut f.dev, SyncInput::Disconnected).unwrap();
    assert_eq!(f.dev.status().unwrap().auth_failure, None);
    f.time.set(T0 + 3_600_000);
    assert!(m.should_connect(&f.dev), "the device keeps trying its relays");

    // The first relay's refusal is final.
    m.set_on_other_relay(false);
    refuse(&mut m, &mut f);
    assert_eq!(m.phase(), Phase::AuthFailed);
    assert!(f.dev.status().unwrap().auth_failure.is_some());
}

#[test]
fn once_another_relay_named_the_devices_cluster_its_refusal_is_final() {
    let mut f = enrolled(41);
    let mut m = SyncMachine::default();
    m.set_on_other_relay(true);
    let out = m.handle(&mut f.dev, SyncInput::Connected).unwrap();
    assert_eq!(out.len(), 1);
    m.handle(
        &mut f.dev,
        SyncInput::Message(RelayMessage::Challenge {
            relay_id: relay_id(),
            nonce: Bytes(vec![7; 32]),
        }),
    )
    .unwrap();
    m.handle(
        &mut f.dev,
        SyncInput::Message(RelayMessage::AuthFailed {
            reason: AuthFailure::Revoked,
            message: "revoked".into(),
        }),
    )
    .unwrap_err();
    assert_eq!(m.phase(), Phase::AuthFailed, "a relay of its own cluster revoked it");
}

#[test]
fn the_relay_list_is_checked_deduplicated_and_kept_across_restarts() {
    let mut f = Fixture::new(42);
    assert!(
        matches!(f.dev.set_relays(&["ws://a:1".into()]), Err(PeerError::NotAllowed(_))),
        "not before enrolling"
    );
    enroll(&mut f.dev, Role::Clinician);
    assert_eq!(f.dev.relay_urls(), vec!["ws://relay.test/v1/sync".to_string()]);
    let bad = f.dev.set_relays(&["ws://a:1".into(), "http://b:2".into()]);
    assert!(
        matches!(&bad, Err(PeerError::BadRelayAddress(u)) if u == "http://b:2"),
        "{bad:?}"
    );
    assert_eq!(f.dev.relay_urls().len(), 1, "nothing stored from a bad list");
    assert!(matches!(f.dev.set_relays(&[]), Err(PeerError::NotAllowed(_))));

    f.dev
        .set_relays(&["ws://a:1/".into(), " ws://b:2".into(), "ws://a:1".into()])
        .unwrap();
    assert_eq!(f.dev.relay_urls(), vec!["ws://a:1".to_string(), "ws://b:2".to_string()]);
    let f = f.reopen(43);
    assert_eq!(f.dev.relay_urls(), vec!["ws://a:1".to_string(), "ws://b:2".to_string()]);
    let e = f.dev.enrollment().unwrap();
    assert_eq!((e.relay_url.as_str(), e.relay_id), ("ws://a:1", relay_id()));
}
