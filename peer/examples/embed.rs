//! The program README's "Embed it" shows: one `Client` per device, enrolled, started, writing,
//! and listening. Run against a relay: `cargo run -p fieldsync-peer --example embed -- \
//! ./my-device ws://127.0.0.1:7070 TOKEN` (the token from `fieldsync-relay admin enroll USER`).
use fieldsync_peer::{Client, ClientEvent, Notice};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, relay, token] = args.as_slice() else {
        return Err("usage: embed DEVICE_DIR RELAY_URL TOKEN".into());
    };
    let client = Client::open(std::path::Path::new(dir))?;
    if client.status()?.enrolled.is_none() {
        client.enroll(relay, token).await?;
    }
    let mut events = client.subscribe();
    client.start()?;

    let patient = client.write("patient").set("name", "Ada Lovelace").save()?;
    println!("wrote patient {} (durable locally, syncing)", patient.entity_id);

    while let Ok(event) = events.recv().await {
        match event {
            ClientEvent::Notice(Notice::Changed { entity_type, entity_id }) => {
                println!(
                    "{entity_type} {entity_id} changed: {:?}",
                    client.get(entity_id)?.map(|e| e.fields)
                );
            }
            ClientEvent::Status(s) => println!("{:?}, {} unsynced", s.state, s.unsynced),
            ClientEvent::Stopped { reason } => return Err(reason.into()),
            _ => {}
        }
    }
    Ok(())
}
