//! Sources of events and catalog records: JSON Lines files ([`file`]) and Kafka topics
//! ([`kafka`]). Both hand the engine raw bytes with their [`Origin`]; parsing is the engine's.

pub mod file;
pub mod kafka;

pub use file::{LineSource, Next};

use std::fmt;

/// Where a record came from, as dead letters name it: `file:line` or `topic/partition/offset`.
#[derive(Clone, Copy, Debug)]
pub enum Origin<'a> {
    Line {
        path: &'a str,
        number: u64,
    },
    Message {
        topic: &'a str,
        partition: i32,
        offset: i64,
    },
}

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Line { path, number } => write!(f, "{path}:{number}"),
            Origin::Message {
                topic,
                partition,
                offset,
            } => write!(f, "{topic}/{partition}/{offset}"),
        }
    }
}

/// Which stream a record belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stream {
    Events,
    Catalog,
}
