//! Resource attacks on a real relay process: idle and half-open connections, requests pipelined
//! past the in-flight limits, a reader that stops reading, oversized and malformed frames. Each
//! test asserts the refusal or disconnect, that nothing was stored, that the relay's memory
//! stays bounded, and that an honest device still syncs promptly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fieldsync_schema::wire::{ErrorCode, MAX_BATCH, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use fieldsync_schema::{Bytes, ClientMessage, PullCursor, RelayMessage};
use fieldsync_tests::attacker::{
    Dev, Ending, RawConn, honest_round_trip, relay_pid, rss_kib, run, status, stored, tcp_state,
};
use fieldsync_tests::{Relay, eventually};
use rand_core::{Rng, SeedableRng};
use serde_json::json;
use tokio::io::AsyncWriteExt;

fn connections(relay: &Relay) -> u64 {
    status(relay)["connections"].as_u64().unwrap()
}

#[test]
fn hundreds_of_idle_and_half_open_connections_do_not_stop_honest_devices() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    run(async {
        let pid = relay_pid(&relay);
        let rss_before = rss_kib(pid);
        // TCP connections that never say anything, and some that stop half way through the
        // HTTP upgrade request.
        let mut tcp = Vec::new();
        for i in 0..150 {
            let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
            if i % 3 == 0 {
                s.write_all(b"GET /v1/sync HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n")
                    .await
                    .unwrap();
            }
            tcp.push(s);
        }
        // WebSocket connections that never send Hello, and some that never answer the challenge.
        let dev = Dev::enroll(&relay, "dana", 1).await;
        let mut idle = Vec::new();
        for i in 0..250 {
            let mut conn = RawConn::open(&relay).await;
            if i % 5 == 0 {
                conn.send(&dev.hello()).await;
                assert!(matches!(conn.recv().await, RelayMessage::Challenge { .. }));
            }
            idle.push(conn);
        }
        assert!(eventually(Duration::from_secs(5), || connections(&relay) >= 250));
        // An honest device enrolls, writes, syncs, and a second one receives the write.
        let took = honest_round_trip(&relay, dir.path(), "dana", "patient", json!({"name": "Ada"})).await;
        assert!(took < Duration::from_secs(10), "the honest round trip took {took:?}");
        let rss_during = rss_kib(pid);
        eprintln!(
            "relay RSS {rss_before} KiB before, {rss_during} KiB with 400 idle connections; honest round trip {took:?}"
        );
        assert!(
            rss_during < rss_before + 64 * 1024,
            "idle connections cost {} KiB",
            rss_during - rss_before
        );
        drop(tcp);
        drop(idle);
        assert!(
            eventually(Duration::from_secs(5), || connections(&relay) == 0),
            "closed connections were not forgotten: {}",
            status(&relay)
        );
    });
}

/// Pipelines `msgs` in one write without reading, then reads: the relay must cut the connection
/// for exceeding the in-flight limit on `what` long before answering everything. Its
/// `Error{LimitExceeded}` and close frame can be overtaken by the TCP reset its close causes
/// (our frames are still unread), so the reason is also checked in the relay's log.
async fn pipelined(relay: &Relay, dev: &Dev, msgs: Vec<ClientMessage>, what: &str) {
    let mut conn = dev.connect(relay).await;
    let n = msgs.len();
    for m in &msgs {
        conn.feed(m).await;
    }
    let _ = conn.try_flush().await;
    let (answers, end) = conn.until_end().await;
    for m in &answers {
        match m {
            RelayMessage::Error { code, message } => {
                assert_eq!(*code, ErrorCode::LimitExceeded, "{message}");
                assert!(message.contains(what), "{message}");
            }
            RelayMessage::Changes { .. } | RelayMessage::Pong { .. } | RelayMessage::PushResult { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(end.is_close_or_reset(1008), "{what}: {end:?}");
    assert!(
        answers.len() < n / 2,
        "{what}: {} of {n} pipelined requests were answered",
        answers.len()
    );
    let logged = eventually(Duration::from_secs(5), || {
        relay
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("request limit exceeded") && l.contains(what))
    });
    assert!(logged, "the relay did not log the {what} limit");
    relay.logs.lock().unwrap().clear();
}

#[test]
fn requests_pipelined_beyond_the_in_flight_limits_are_cut() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(&dir.path().join("relay"), 0, &[], &[("RUST_LOG", "info")]);
    relay.setup("clinic", &[("dana", "clinician")]);
    run(async {
        let mut dev = Dev::enroll(&relay, "dana", 1).await;
        // Within the limits: two pulls and eight pings in flight are answered.
        let mut conn = dev.connect(&relay).await;
        for _ in 0..2 {
            conn.feed(&ClientMessage::Pull {
                cursor: PullCursor::default(),
                max_entries: 10,
            })
            .await;
        }
        for nonce in 0..8 {
            conn.feed(&ClientMessage::Ping { nonce }).await;
        }
        conn.flush().await;
        let mut answers = 0;
        while answers < 10 {
            match conn.recv().await {
                RelayMessage::Changes { .. } | RelayMessage::Pong { .. } => answers += 1,
                other => panic!("{other:?}"),
            }
        }
        let (_, m) = dev.create("patient", json!({"name": "Within limits"}));
        assert!(dev.push_one(&mut conn, m).await.applied().is_some());
        let before = stored(&relay);

        let pull = ClientMessage::Pull {
            cursor: PullCursor::default(),
            max_entries: 1000,
        };
        pipelined(&relay, &dev, vec![pull; 500], "pulls in flight").await;
        let pushes = (0..500)
            .map(|batch_id| ClientMessage::Push {
                batch_id,
                mutations: Vec::new(),
            })
            .collect();
        pipelined(&relay, &dev, pushes, "pushes in flight").await;
        let pings = (0..5000).map(|nonce| ClientMessage::Ping { nonce }).collect();
        pipelined(&relay, &dev, pings, "pings in flight").await;
        assert_eq!(stored(&relay).data(), before.data());
        // The well-behaved connection opened first is still served.
        let before = conn.barrier(77).await;
        assert!(
            before.iter().all(|m| matches!(m, RelayMessage::Live { .. })),
            "{before:?}"
        );
        let took = honest_round_trip(&relay, dir.path(), "dana", "patient", json!({"name": "Ada"})).await;
        assert!(took < Duration::from_secs(10), "{took:?}");
    });
}

/// `n` characters of incompressible text.
fn noise(rng: &mut impl Rng, n: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..n)
        .map(|_| ALPHABET[(rng.next_u32() % 64) as usize] as char)
        .collect()
}

struct SlowReader {
    relay: Relay,
    dir: tempfile::TempDir,
}

/// A reader caught up on space "gym" (so it is sent every write live) stops reading, while a
/// writer pushes 3 MB batches of incompressible plans into the space until the relay counts a
/// slow-reader disconnect (about 12 MB: the socket buffers, then the 8 MiB queue). Returns the
/// reader's connection and device, the relay's RSS before and after, and how long it took.
async fn slow_reader_cut(s: &SlowReader, seed: u64) -> (RawConn, Dev, u64, u64, Duration) {
    let relay = &s.relay;
    let mut writer = Dev::enroll(relay, "owen", seed * 2).await;
    let mut wc = writer.connect(relay).await;
    let mut reader = Dev::enroll(relay, "lurker", seed * 2 + 1).await;
    let mut rc = reader.connect(relay).await;
    reader.pull_all(&mut rc).await;
    let pid = relay_pid(relay);
    let rss_before = rss_kib(pid);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let started = Instant::now();
    let mut pushed = 0usize;
    let mut batches = 0;
    let cut_before = status(relay)["slow_reader_disconnects"].as_u64().unwrap();
    while status(relay)["slow_reader_disconnects"].as_u64().unwrap() == cut_before {
        assert!(batches < 16, "the reader was never cut after {pushed} bytes");
        let mut batch = Vec::new();
        for _ in 0..30 {
            let (_, m) = writer.create("plan", json!({"name": "Plan", "details": noise(&mut rng, 99_000)}));
            pushed += m.changes.iter().map(|c| c.0.len()).sum::<usize>();
            batch.push(m);
        }
        let results = writer.push(&mut wc, batch).await;
        assert!(
            results.iter().all(|r| r.outcome.applied().is_some()),
            "{:?}",
            results[0]
        );
        batches += 1;
        // Give the fan-out a moment to fill the reader's queue before looking again.
        eventually(Duration::from_millis(500), || {
            status(relay)["slow_reader_disconnects"].as_u64().unwrap() > cut_before
        });
    }
    let took = started.elapsed();
    let rss_after = rss_kib(pid);
    eprintln!(
        "slow reader cut after {batches} batches ({pushed} bytes) in {took:?}; relay RSS {rss_before} → {rss_after} KiB"
    );
    (rc, reader, rss_before, rss_after, took)
}

fn slow_reader_relay() -> SlowReader {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("gym", &[("owen", "admin"), ("lurker", "patient")]);
    relay.setup("clinic", &[("hank", "clinician")]);
    SlowReader { relay, dir }
}

#[test]
fn a_reader_that_stops_reading_is_cut_and_the_relay_stays_bounded() {
    let s = slow_reader_relay();
    run(async {
        let (mut rc, mut reader, rss_before, rss_after, _) = slow_reader_cut(&s, 1).await;
        // Bounded: for the reader the relay holds at most the queue's 8 MiB and one frame; the
        // rest of the growth is the writer's documents (parsed and cached).
        assert!(
            rss_after < rss_before + 160 * 1024,
            "the relay grew from {rss_before} to {rss_after} KiB"
        );
        // Everyone else is served meanwhile.
        let took = honest_round_trip(&s.relay, s.dir.path(), "hank", "patient", json!({"name": "Ada"})).await;
        assert!(took < Duration::from_secs(10), "{took:?}");
        // When the reader reads again, it finds the connection closed with a reason after what
        // was already on its way, and nothing refused it data it may see: it reconnects and
        // pulls everything.
        let (msgs, end) = rc.until_end().await;
        assert!(
            msgs.iter().all(|m| matches!(m, RelayMessage::Live { .. })),
            "{:?}",
            msgs.iter().map(RelayMessage::name).collect::<Vec<_>>()
        );
        match &end {
            Ending::Closed(1008, reason) => assert!(reason.contains("send queue full"), "{reason}"),
            other => panic!("the slow reader's connection ended with {other:?}"),
        }
        // Pipelined pulls of 3 MB pages, none read: without the in-flight limit the relay
        // would build all 500 (1.5 GB); it builds at most two, so its memory stays flat.
        let pid = relay_pid(&s.relay);
        let rss_idle = rss_kib(pid);
        let mut greedy = reader.connect(&s.relay).await;
        for _ in 0..500 {
            greedy
                .feed(&ClientMessage::Pull {
                    cursor: PullCursor::default(),
                    max_entries: 1000,
                })
                .await;
        }
        let _ = greedy.try_flush().await;
        let mut peak = rss_idle;
        let window = Instant::now();
        while window.elapsed() < Duration::from_secs(2) {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("500 pipelined 3 MB pulls: relay RSS {rss_idle} KiB before, peak {peak} KiB");
        assert!(
            peak < rss_idle + 64 * 1024,
            "the relay grew from {rss_idle} to {peak} KiB"
        );
        let (answers, end) = greedy.until_end().await;
        let pages = answers
            .iter()
            .filter(|m| matches!(m, RelayMessage::Changes { .. }))
            .count();
        assert!(pages < 50, "{pages} of 500 pipelined pulls were answered");
        assert!(end.is_close_or_reset(1008), "{end:?}");
        // The reader reconnects and gets everything from a fresh pull.
        let mut again = reader.connect(&s.relay).await;
        let entries = reader.pull_all(&mut again).await;
        let plans = entries.iter().filter(|e| e.entity_type == "plan").count();
        assert!(plans >= 30, "{plans}");
        let stored_plans = fieldsync_tests::attacker::count_in_shards(
            &s.relay,
            "SELECT COUNT(*) FROM documents WHERE entity_type = 'plan'",
            [],
        );
        assert_eq!(plans as u64, stored_plans);
    });
}

/// A cut slow reader must actually be disconnected: the relay gives up on the socket instead
/// of waiting forever for the peer to read what it already buffered.
#[test]
fn a_cut_slow_reader_is_disconnected_even_if_it_never_reads_again() {
    let s = slow_reader_relay();
    run(async {
        let (rc, _, _, _, _) = slow_reader_cut(&s, 1).await;
        let local = rc.local_addr();
        // The relay's side of the socket leaves ESTABLISHED (it closes) within a few seconds.
        const ESTABLISHED: u8 = 0x01;
        let closed = eventually(Duration::from_secs(5), || {
            tcp_state(s.relay.addr, local) != Some(ESTABLISHED)
        });
        assert!(
            closed,
            "5 s after the cut the relay still holds the slow reader's connection open (status: {})",
            status(&s.relay)
        );
        drop(rc);
    });
}

/// The CBOR of a message that does not exist (`[version, {"foo": 1}]`): its decode error is
/// long.
fn unknown_message() -> Vec<u8> {
    vec![0x82, PROTOCOL_VERSION as u8, 0xA1, 0x63, b'f', b'o', b'o', 0x01]
}

/// A WebSocket close reason must fit a control frame (123 bytes); a relay that echoes a long
/// decode error in it sends a frame the client must reject as a protocol error, so the device
/// never learns the code or the reason.
#[test]
fn a_malformed_message_with_a_long_decode_error_still_gets_a_valid_close() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    run(async {
        let mut conn = RawConn::open(&relay).await;
        conn.send_bytes(unknown_message()).await.unwrap();
        let (message, end) = conn.expect_error_close(ErrorCode::Malformed).await;
        assert!(message.len() > 123, "{message}");
        assert_eq!(end.code(), Some(1002), "{end:?}");
    });
}

/// A cut slow reader must be told why: 1008 "send queue full". The connection task once picked
/// at random between its kill signal and its drained, closed queue, and the latter ended the
/// connection as 1013 "relay shutting down", which is false (now the kill is preferred). Two
/// rounds would show a coin flip most of the time.
#[test]
fn a_cut_slow_reader_is_told_that_it_was_too_slow() {
    let s = slow_reader_relay();
    run(async {
        for round in 0..2 {
            let (mut rc, _, _, _, _) = slow_reader_cut(&s, round + 1).await;
            let (_, end) = rc.until_end().await;
            match &end {
                Ending::Closed(1008, reason) if reason.contains("send queue full") => {}
                other => panic!("round {round}: the cut slow reader was told {other:?}"),
            }
        }
    });
}

#[test]
fn oversized_malformed_and_text_frames_and_oversized_batches_are_refused_with_a_close() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&dir.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    run(async {
        let mut dev = Dev::enroll(&relay, "dana", 1).await;
        let before = stored(&relay);
        let mut deep = vec![0x81u8; 100_000];
        deep.push(0x01);
        // A byte string claiming 2^62 bytes, inside an otherwise plausible Auth.
        let mut huge_len = vec![0x82, PROTOCOL_VERSION as u8, 0xA1, 0x64];
        huge_len.extend_from_slice(b"auth");
        huge_len.extend_from_slice(&[0xA1, 0x69]);
        huge_len.extend_from_slice(b"signature");
        huge_len.extend_from_slice(&[0x5B, 0x40, 0, 0, 0, 0, 0, 0, 0]);
        let mut future = Vec::new();
        future.extend_from_slice(&[0x82, 0x02, 0x65]);
        future.extend_from_slice(b"hello");
        let garbage: Vec<(&str, Vec<u8>)> = vec![
            ("garbage", vec![0xde, 0xad, 0xbe, 0xef]),
            ("empty", Vec::new()),
            ("deep nesting", deep),
            ("a huge declared length", huge_len),
            ("another protocol version", future),
        ];
        for authenticated in [false, true] {
            for (name, bytes) in &garbage {
                let mut conn = if authenticated {
                    dev.connect(&relay).await
                } else {
                    RawConn::open(&relay).await
                };
                conn.send_bytes(bytes.clone()).await.unwrap();
                let (message, end) = conn.expect_error_close(ErrorCode::Malformed).await;
                assert_eq!(end.code(), Some(1002), "{name}: {message}: {end:?}");
            }
            // A message that does not exist: refused as malformed (the close frame is invalid,
            // see the test above, so only the error is checked here).
            let mut conn = if authenticated {
                dev.connect(&relay).await
            } else {
                RawConn::open(&relay).await
            };
            conn.send_bytes(unknown_message()).await.unwrap();
            let (message, _) = conn.expect_error_close(ErrorCode::Malformed).await;
            assert!(message.contains("unknown variant"), "{message}");
            let mut conn = if authenticated {
                dev.connect(&relay).await
            } else {
                RawConn::open(&relay).await
            };
            conn.send_text("{\"hello\": true}").await.unwrap();
            let (msgs, end) = conn.until_end().await;
            assert!(msgs.is_empty(), "{msgs:?}");
            assert_eq!(end.code(), Some(1003), "{end:?}");
        }
        // Frames above the limit, before and after authentication (a push of one huge change).
        let mut conn = RawConn::open(&relay).await;
        let _ = conn.send_bytes(vec![0x41; MAX_MESSAGE_BYTES + 1]).await;
        let (msgs, end) = conn.until_end().await;
        assert!(msgs.iter().all(|m| matches!(m, RelayMessage::Error { .. })), "{msgs:?}");
        assert_eq!(
            end.code(),
            Some(1009),
            "a frame over the limit is closed as too big: {end:?}"
        );
        let mut conn = dev.connect(&relay).await;
        let (id, mut m) = dev.create("patient", json!({"name": "Huge"}));
        m.changes.push(Bytes(vec![0; MAX_MESSAGE_BYTES]));
        let m = dev.resign(m);
        let _ = conn
            .send_bytes(
                ClientMessage::Push {
                    batch_id: 1,
                    mutations: vec![m],
                }
                .encode(),
            )
            .await;
        let (msgs, end) = conn.until_end().await;
        assert!(msgs.iter().all(|m| matches!(m, RelayMessage::Error { .. })), "{msgs:?}");
        assert_eq!(end.code(), Some(1009), "{end:?}");
        dev.forget(id);
        // A batch of MAX_BATCH + 1 valid mutations.
        let mut conn = dev.connect(&relay).await;
        let batch: Vec<_> = (0..=MAX_BATCH)
            .map(|i| dev.create("patient", json!({"name": format!("P{i}")})).1)
            .collect();
        conn.send(&ClientMessage::Push {
            batch_id: 9,
            mutations: batch,
        })
        .await;
        let (message, end) = conn.expect_error_close(ErrorCode::LimitExceeded).await;
        assert_eq!(end.code(), Some(1008), "{message}");
        assert!(message.contains("257"), "{message}");

        // Nothing of it was stored, not even a receipt.
        assert_eq!(stored(&relay), before);
        assert!(
            eventually(Duration::from_secs(5), || connections(&relay) == 0),
            "{}",
            status(&relay)
        );
        let took = honest_round_trip(&relay, dir.path(), "dana", "patient", json!({"name": "Ada"})).await;
        assert!(took < Duration::from_secs(10), "{took:?}");
    });
}
