//! Freshness: time from producing an event to Kafka until `GET /v1/users/{id}` reflects it.
//!
//! Run by `scripts/bench-freshness.sh`, which starts the broker and `persona run`. Events are
//! produced at a steady `--rate` (or as fast as the broker takes them with `--rate max`) for
//! `--seconds`; every `--probe-every`-th event belongs to a user of its own, and a prober polls
//! that user with `?min_as_of_ms=<its ts>` until the profile exists. The latency of a probe is
//! first successful answer − the moment the event was handed to the producer. Figures are
//! printed, never asserted.
//!
//! `--broker-only` measures the floor instead: the same production, read back by a plain
//! consumer (no engine), every event timed.

use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
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
    /// The producer's linger.ms (batching delay).
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Time produce → plain consumer, without the engine.
    #[arg(long)]
    broker_only: bool,
    /// Ignored (cargo bench passes it).
    #[arg(long)]
    bench: bool,
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
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
        .set("linger.ms", args.linger_ms.to_string())
        // Bounded, so that at `--rate max` the producer runs at the broker's pace rather than
        // filling memory.
        .set("queue.buffering.max.messages", "20000")
        .create()
        .expect("producer");
    let (probe_tx, probe_rx) = crossbeam_channel::unbounded::<Probe>();
    let (lat_tx, lat_rx) = crossbeam_channel::unbounded::<Option<f64>>();
    let mut probers = Vec::new();
    if args.broker_only {
        let tx = lat_tx.clone();
        let (brokers, topic, partitions) =
            (args.brokers.clone(), args.topic.clone(), args.partitions);
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<()>(1);
        probers.push(std::thread::spawn(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", "freshness-broker-only")
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "10")
                .create()
                .expect("consumer");
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition_offset(&topic, p as i32, Offset::End)
                    .expect("partition");
            }
            consumer.assign(&tpl).expect("assign");
            for _ in 0..10 {
                consumer.poll(Duration::from_millis(50));
            }
            let _ = ready_tx.send(());
            let mut idle = Instant::now();
            while idle.elapsed() < Duration::from_secs(5) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    idle = Instant::now();
                    let sent = m
                        .payload()
                        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                        .and_then(|v| v["sent_us"].as_u64());
                    if let Some(us) = sent {
                        let _ = tx.send(Some((wall_us().saturating_sub(us)) as f64 / 1e3));
                    }
                }
            }
        }));
        let _ = ready_rx.recv();
    }
    for _ in 0..if args.broker_only { 0 } else { args.probers } {
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
                            std::thread::sleep(Duration::from_millis(2))
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
            r#"{{"event_id":"fr-{run}-{sent}","user_id":"{user}","type":"page_view","ts":{ts},"sent_us":{}}}"#,
            wall_us()
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
        if probe && !args.broker_only {
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
        "{} | rate {:>6} | sent {sent} in {elapsed:.1} s = {:.0} events/s | timed {} (lost {lost}) | p50 {:.1} ms | p99 {:.1} ms | max {:.1} ms",
        if args.broker_only { "broker only" } else { "persona    " },
        args.rate,
        sent as f64 / elapsed,
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
    );
}
