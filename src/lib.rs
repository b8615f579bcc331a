//! persona's I/O shell: configuration, sources, parsing, the engine loop, HTTP and commands.
//!
//! ```text
//! file / kafka source ─▶ parse/validate ─▶ (dead letters) ─▶ events input ─▶ views (persona-dataflows)
//!   (source)                (parse)      (deadletter, sink)    (engine)         ─▶ profile arrangement
//!                                                                        ◀─ queries (query) ◀─ HTTP (http)
//! ```

pub mod affinity;
pub mod auth;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod deadletter;
pub mod engine;
pub mod erasure;
pub mod evaluate;
pub mod forward;
pub mod generate;
pub mod http;
pub mod kafka_client;
pub mod kafka_tools;
pub mod live;
pub mod metrics;
pub mod names;
pub mod optimes;
pub mod parse;
pub mod profile_cache;
pub mod query;
pub mod render;
pub mod replay;
pub mod run;
pub mod server;
pub mod sink;
pub mod source;
pub mod stream;
pub mod tls;
pub mod validate;
