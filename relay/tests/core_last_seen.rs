//! `device list` shows when each device was last seen: written at sign-in and refreshed by the
//! core's tick while the session lasts, not on every message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::TestRelay;
use fieldsync_schema::Role;

#[test]
fn a_long_session_keeps_the_device_last_seen_time_current() {
    use fieldsync_relay::core::Input;
    use fieldsync_relay::store::{Backend, Directory};

    let mut relay = TestRelay::new();
    relay.space("clinic");
    relay.user("dana", "clinic", Role::Clinician);
    let dev = relay.device("dana", 1);
    let seen = |relay: &TestRelay| {
        let directory = relay.backend.open_directory().unwrap();
        directory.device(dev.device_id).unwrap().unwrap().last_seen_ms.unwrap()
    };
    let signed_in = seen(&relay);
    relay.now += 30_000;
    relay.core.handle([Input::Tick], relay.now);
    assert_eq!(seen(&relay), signed_in, "not rewritten on every tick");
    relay.now += 31_000;
    relay.core.handle([Input::Tick], relay.now);
    assert_eq!(seen(&relay), relay.now, "refreshed a minute into the session");
}
