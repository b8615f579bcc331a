//! A real Kafka-protocol broker (tansu, installed by `scripts/kafka.sh install`) per test, on
//! its own loopback port, with topics made by tansu's own CLI; and a plain rdkafka reader of
//! whole topics, independent of persona's source.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tansu binary: `$TANSU`, else on `PATH`, else `~/.cargo/bin/tansu`.
pub fn tansu() -> PathBuf {
    if let Ok(t) = std::env::var("TANSU") {
        return t.into();
    }
    if let Some(p) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    }) {
        return p;
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let p = home.join("bin/tansu");
    assert!(
        p.is_file(),
        "the Kafka tests need the tansu broker: run scripts/kafka.sh install (or set TANSU)"
    );
    p
}

/// A free loopback port (bound, then released for the broker).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Broker {
    pub addr: String,
    storage: String,
    /// The broker's working directory (tansu reads `sqlite://` paths relative to it).
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// A broker keeping its topics in memory.
    pub fn memory() -> Broker {
        Broker::start_on(free_port(), "memory://tansu/".into(), None)
    }

    /// A broker keeping its topics in an SQLite file under `dir` (they survive a restart).
    pub fn sqlite(dir: &Path) -> Broker {
        Broker::start_on(free_port(), "sqlite://tansu.db".into(), Some(dir))
    }

    /// The address a broker would get, without starting it (to start clients first).
    pub fn not_started(dir: &Path) -> Broker {
        Broker {
            addr: format!("127.0.0.1:{}", free_port()),
            storage: "sqlite://tansu.db".into(),
            dir: dir.to_path_buf(),
            log: dir.join("tansu.log"),
            child: None,
        }
    }

    fn start_on(port: u16, storage: String, dir: Option<&Path>) -> Broker {
        let log = dir
            .map(|d| d.join("tansu.log"))
            .unwrap_or_else(|| std::env::temp_dir().join(format!("tansu-{port}.log")));
        let mut b = Broker {
            addr: format!("127.0.0.1:{port}"),
            storage,
            dir: dir
                .map(Path::to_path_buf)
                .unwrap_or_else(std::env::temp_dir),
            log,
            child: None,
        };
        b.start();
        b
    }

    /// Starts (or restarts) the broker process and waits until it accepts connections.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let url = format!("tcp://{}", self.addr);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(tansu())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &self.storage])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&self.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu does not listen on {}; log {}",
                self.addr,
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the broker (SIGKILL: no orderly shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        let out = Command::new(tansu())
            .args(["topic", "create", name, "--broker"])
            .arg(format!("tcp://{}", self.addr))
            .args(["--partitions", &partitions.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tansu topic create {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every message of `topic` (all partitions, from the start): (partition, offset, payload).
    pub fn read_topic(&self, topic: &str, partitions: i32) -> Vec<(i32, i64, Vec<u8>)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("group.id", format!("test-reader-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut open: Vec<i32> = (0..partitions).collect();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !open.is_empty() {
            assert!(Instant::now() < deadline, "reading {topic} timed out");
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => out.push((
                    m.partition(),
                    m.offset(),
                    m.payload().unwrap_or_default().to_vec(),
                )),
                Some(Err(KafkaError::PartitionEOF(p))) => open.retain(|q| *q != p),
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}
