//! Freshness: time from producing an event to Kafka until `GET /v1/users/{id}` reflects it.
//!
//! Run by `scripts/bench-freshness.sh`, which starts the broker and `persona run`. Events are
//! produced at a steady `--rate` (or as fast as the broker takes them with `--rate max`) for
//! `--seconds`; every `--probe-every`-th event belongs to a user of its own, and a prober polls
//! that user with `?min_as_of_ms=<its ts>` until the profile exists. The latency of a probe is
//! first successful answer − the moment the event was handed to the producer. Figures are
//! printed, never asserted.

use clap::Parser;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long, default_value = "persona-events")]
    topic: String,
    /// Partitions of the topic (events are partitioned by user like `persona produce`).
    #[arg(long, default_value_t = 2)]
    partitions: usize,
    /// The engine's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Events per second, or "max".
    #[arg(long, default_value = "10000")]
    rate: String,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 20)]
    probe_every: u64,
    #[arg(long, default_value_t = 4)]
    probers: usize,
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Ignored (cargo bench passes it).
    #[arg(long)]
    bench: bool,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

struct Probe {
    user: String,
    ts: u64,
    sent: Instant,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn main() {
    let args = Args::parse();
    let rate: Option<f64> = match args.rate.as_str() {
        "max" => None,
        r => Some(r.parse().expect("--rate: a number or max")),
    };
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let (probe_tx, probe_rx) = crossbeam_channel::unbounded::<Probe>();
    let (lat_tx, lat_rx) = crossbeam_channel::unbounded::<Option<f64>>();
    let mut probers = Vec::new();
    for _ in 0..args.probers {
        let rx = probe_rx.clone();
        let tx = lat_tx.clone();
        let url = args.url.clone();
        probers.push(std::thread::spawn(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build();
            for p in rx {
                let path = format!(
                    "{url}/v1/users/{}?min_as_of_ms={}&timeout_ms=5000",
                    p.user, p.ts
                );
                let deadline = p.sent + Duration::from_secs(10);
                let latency = loop {
                    match agent.get(&path).call() {
                        Ok(_) => break Some(p.sent.elapsed().as_secs_f64() * 1e3),
                        Err(_) if Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(1))
                        }
                        Err(_) => break None,
                    }
                };
                let _ = tx.send(latency);
            }
        }));
    }
    drop(lat_tx);
    let run = wall_ms();
    let started = Instant::now();
    let end = started + Duration::from_secs(args.seconds);
    let mut sent = 0u64;
    while Instant::now() < end {
        if let Some(r) = rate {
            let due = started + Duration::from_secs_f64(sent as f64 / r);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let probe = sent.is_multiple_of(args.probe_every);
        let user = if probe {
            format!("probe-{run}-{sent}")
        } else {
            format!("u{}", sent % args.users)
        };
        let ts = wall_ms();
        let sent_at = Instant::now();
        let payload = format!(
            r#"{{"event_id":"fr-{run}-{sent}","user_id":"{user}","type":"page_view","ts":{ts}}}"#
        );
        let partition = persona_dataflows::owner(persona::names::hash(&user), args.partitions);
        loop {
            let record = BaseRecord::to(&args.topic)
                .payload(&payload)
                .key(&user)
                .partition(partition as i32);
            match producer.send(record) {
                Ok(()) => break,
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        if probe {
            let _ = probe_tx.send(Probe {
                user,
                ts,
                sent: sent_at,
            });
        }
        sent += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(probe_tx);
    let _ = producer.flush(Duration::from_secs(30));
    let mut lat: Vec<f64> = Vec::new();
    let mut lost = 0;
    for l in lat_rx {
        match l {
            Some(ms) => lat.push(ms),
            None => lost += 1,
        }
    }
    for p in probers {
        let _ = p.join();
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "rate {:>6} | sent {sent} in {elapsed:.1} s = {:.0} events/s | probes {} (lost {lost}) | p50 {:.1} ms | p99 {:.1} ms | max {:.1} ms",
        args.rate,
        sent as f64 / elapsed,
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
    );
}
