//! `docs/protocol.md` cannot drift from the code: every example block in it (```` ```hex
//! example=NAME ````) is recomputed here from the same fixed inputs the document states, and
//! must match byte for byte. A failure prints the block as the code now produces it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fieldsync_schema::signing::{DeviceKey, connect_signing_bytes, enroll_signing_bytes, mutation_signing_bytes};
use fieldsync_schema::wire::PROTOCOL_VERSION;
use fieldsync_schema::{Bytes, ClientMessage, Hlc, Mutation, MutationKind, PullCursor, SchemaHash};
use uuid::Uuid;

/// The fixed inputs, as docs/protocol.md lists them under "Worked examples".
struct Inputs {
    device: Uuid,
    relay: Uuid,
    user: Uuid,
    space: Uuid,
    entity: Uuid,
    mutation: Uuid,
    key: DeviceKey,
    schema_hash: SchemaHash,
    nonce: Vec<u8>,
}

fn inputs() -> Inputs {
    Inputs {
        device: Uuid::parse_str("d0000000-0000-4000-8000-000000000001").unwrap(),
        relay: Uuid::parse_str("a0000000-0000-4000-8000-000000000002").unwrap(),
        user: Uuid::parse_str("b0000000-0000-4000-8000-000000000003").unwrap(),
        space: Uuid::parse_str("c0000000-0000-4000-8000-000000000004").unwrap(),
        entity: Uuid::parse_str("e0000000-0000-4000-8000-000000000005").unwrap(),
        mutation: Uuid::parse_str("f0000000-0000-4000-8000-000000000006").unwrap(),
        key: DeviceKey::from_secret(&[7u8; 32]),
        schema_hash: SchemaHash([0x5a; 32]),
        nonce: vec![0x42; 32],
    }
}

fn mutation(i: &Inputs) -> Mutation {
    let mut m = Mutation {
        mutation_id: i.mutation,
        device_id: i.device,
        user_id: i.user,
        space_id: i.space,
        entity_type: "patient".into(),
        entity_id: i.entity,
        kind: MutationKind::Create,
        client_timestamp: Hlc {
            physical_ms: 1_795_000_000_000,
            counter: 0,
            device: i.device,
        },
        base_version: None,
        changes: vec![Bytes(vec![0x85, 0x6f, 0x4a, 0x83])],
        signature: Bytes(Vec::new()),
    };
    i.key.sign_mutation(&mut m);
    m
}

/// Every example the document shows, by name, as the code computes it.
fn computed() -> Vec<(&'static str, Vec<u8>)> {
    let i = inputs();
    let public = i.key.public_key();
    let hello = ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        device_id: i.device,
        schema_hash: i.schema_hash,
        schema_version: 1,
        compression: false,
        types: None,
        windowed: false,
        priority: false,
        metered: false,
    };
    let connect = connect_signing_bytes(PROTOCOL_VERSION, &i.relay, &i.nonce, &i.device, &public);
    let auth = ClientMessage::Auth {
        signature: Bytes(i.key.answer_challenge(&i.relay, &i.nonce, &i.device).to_vec()),
    };
    let m = mutation(&i);
    let push = ClientMessage::Push {
        batch_id: 1,
        mutations: vec![m.clone()],
    };
    let pull = ClientMessage::Pull {
        cursor: PullCursor::default(),
        max_entries: 500,
    };
    vec![
        ("public_key", public.to_vec()),
        ("hello", hello.encode()),
        ("connect_signing_bytes", connect),
        ("auth", auth.encode()),
        (
            "enroll_signing_bytes",
            enroll_signing_bytes("fse_example", &i.device, &public),
        ),
        ("mutation_signing_bytes", mutation_signing_bytes(&m)),
        ("mutation_signature", m.signature.0.clone()),
        ("push", push.encode()),
        ("pull", pull.encode()),
    ]
}

/// `name → hex` of every ```` ```hex example=NAME ```` block in the document.
fn documented(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if let Some(name) = line.trim().strip_prefix("```hex example=") {
            let hex: String = lines
                .by_ref()
                .take_while(|l| l.trim() != "```")
                .flat_map(|l| l.chars().filter(|c| c.is_ascii_hexdigit()))
                .collect();
            out.push((name.trim().to_string(), hex.to_lowercase()));
        }
    }
    out
}

fn block(name: &str, bytes: &[u8]) -> String {
    let hex = hex::encode(bytes);
    let lines: Vec<&str> = hex
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!("```hex example={name}\n{}\n```", lines.join("\n"))
}

#[test]
fn every_example_in_the_protocol_document_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
    let doc = std::fs::read_to_string(path).expect("docs/protocol.md");
    let shown = documented(&doc);
    let mut problems = Vec::new();
    for (name, bytes) in computed() {
        match shown.iter().find(|(n, _)| n == name) {
            Some((_, hex)) if *hex == hex::encode(&bytes) => {}
            Some(_) => problems.push(format!("`{name}` differs; the code gives:\n{}", block(name, &bytes))),
            None => problems.push(format!("`{name}` is missing; add:\n{}", block(name, &bytes))),
        }
    }
    for (name, _) in &shown {
        if !computed().iter().any(|(n, _)| n == name) {
            problems.push(format!("`{name}` is in the document but no test computes it"));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/protocol.md is out of date:\n\n{}",
        problems.join("\n\n")
    );
}

#[test]
fn the_documented_frames_decode_as_the_messages_they_claim() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md")).unwrap();
    let shown = documented(&doc);
    let frame = |name: &str| hex::decode(&shown.iter().find(|(n, _)| n == name).unwrap().1).unwrap();
    let i = inputs();
    match ClientMessage::decode(&frame("hello")).unwrap() {
        ClientMessage::Hello { device_id, .. } => assert_eq!(device_id, i.device),
        other => panic!("{other:?}"),
    }
    match ClientMessage::decode(&frame("push")).unwrap() {
        ClientMessage::Push { mutations, .. } => {
            assert_eq!(mutations[0].mutation_id, i.mutation);
            fieldsync_schema::signing::Verifier::new(&i.key.public_key())
                .unwrap()
                .verify_mutation(&mutations[0])
                .unwrap();
        }
        other => panic!("{other:?}"),
    }
}
