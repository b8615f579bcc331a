//! persona's I/O shell: configuration, sources, parsing, the engine loop, HTTP and commands.
//!
//! ```text
//! file source ─▶ parse/validate ─▶ (dead letters) ─▶ events input ─▶ views (persona-dataflows)
//!   (source)       (parse)           (deadletter)      (engine)         ─▶ profile arrangement
//!                                                                        ◀─ queries (query) ◀─ HTTP (http)
//! ```

pub mod config;
pub mod deadletter;
pub mod engine;
pub mod generate;
pub mod http;
pub mod metrics;
pub mod names;
pub mod parse;
pub mod query;
pub mod render;
pub mod replay;
pub mod run;
pub mod server;
pub mod source;
