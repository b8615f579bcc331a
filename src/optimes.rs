//! Time spent in each dataflow operator, from timely's own scheduling log: a diagnostic for
//! finding which arrangement or view a run's time goes to, by name, which a sampling profile
//! of inlined, monomorphised code cannot tell apart. Enabled by `engine.operator_times`
//! (`PERSONA_ENGINE_OPERATOR_TIMES=true`); each worker prints its table to stderr when its
//! loop ends: a replay's once its dump is handed over (`--serve`: at shutdown, serving time
//! included), `run`'s at shutdown. Logging every scheduling costs a few percent of a run.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;
use timely::logging::{StartStop, TimelyEvent, TimelyEventBuilder};
use timely::worker::Worker;

#[derive(Default)]
struct Totals {
    names: HashMap<usize, String>,
    /// Per operator id: time scheduled, minus the time of operators scheduled inside it, and
    /// the number of times it was scheduled.
    own: HashMap<usize, (Duration, u64)>,
    /// `(operator id, started at, time of operators scheduled inside it so far)`.
    open: Vec<(usize, Duration, Duration)>,
    /// The last logged instant: the run's length so far, as the log saw it.
    last: Duration,
}

impl Totals {
    fn record(&mut self, at: Duration, event: &TimelyEvent) {
        self.last = self.last.max(at);
        match event {
            TimelyEvent::Operates(op) => {
                self.names.insert(op.id, op.name.clone());
            }
            TimelyEvent::Schedule(s) => match s.start_stop {
                StartStop::Start => self.open.push((s.id, at, Duration::ZERO)),
                StartStop::Stop => {
                    let Some((id, start, inner)) = self.open.pop() else {
                        return;
                    };
                    debug_assert_eq!(id, s.id, "operators stop in the order they started");
                    let took = at.saturating_sub(start);
                    let own = self.own.entry(id).or_default();
                    own.0 += took.saturating_sub(inner);
                    own.1 += 1;
                    if let Some(parent) = self.open.last_mut() {
                        parent.2 += took;
                    }
                }
            },
            _ => {}
        }
    }
}

/// A worker's operator times, once [`OperatorTimes::register`] has hooked them up.
pub struct OperatorTimes {
    totals: Rc<RefCell<Totals>>,
    worker: usize,
}

impl OperatorTimes {
    /// Starts logging on `worker`. Call before building the dataflow, so that operators'
    /// names are logged.
    pub fn register(worker: &mut Worker) -> Option<Self> {
        let totals = Rc::new(RefCell::new(Totals::default()));
        let sink = Rc::clone(&totals);
        worker
            .log_register()?
            .insert::<TimelyEventBuilder, _>("timely", move |_time, data| {
                if let Some(data) = data {
                    let mut totals = sink.borrow_mut();
                    for (at, event) in data.iter() {
                        totals.record(*at, event);
                    }
                }
            });
        Some(OperatorTimes {
            totals,
            worker: worker.index(),
        })
    }

    /// The table, longest first: operators with at least 0.1 % of the run.
    pub fn report(&self) -> String {
        let totals = self.totals.borrow();
        let run = totals.last.as_secs_f64().max(1e-9);
        let mut rows: Vec<(Duration, u64, usize)> = totals
            .own
            .iter()
            .map(|(id, (d, calls))| (*d, *calls, *id))
            .collect();
        rows.sort_unstable_by(|a, b| b.cmp(a));
        let scheduled: Duration = rows.iter().map(|(d, ..)| *d).sum();
        let mut out = format!(
            "operator times, worker {}: {:.3} s logged, {:.3} s in operators\n",
            self.worker,
            run,
            scheduled.as_secs_f64()
        );
        for (d, calls, id) in rows {
            let share = d.as_secs_f64() / run;
            if share < 0.001 {
                break;
            }
            let name = totals.names.get(&id).map_or("?", String::as_str);
            out.push_str(&format!(
                "{:>8.3} s {:>5.1} % {calls:>8} runs  {name} (#{id})\n",
                d.as_secs_f64(),
                100.0 * share
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use timely::logging::{OperatesEvent, ScheduleEvent};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn schedule(id: usize, start_stop: StartStop) -> TimelyEvent {
        TimelyEvent::Schedule(ScheduleEvent { id, start_stop })
    }

    /// A region scheduled for 10 ms that schedules one operator for 3 ms and another twice
    /// for 2 ms: the region's own time is what its children did not take.
    #[test]
    fn nested_operators_are_taken_out_of_their_parents_time() {
        let mut t = Totals::default();
        for (id, name) in [(1, "region"), (2, "a"), (3, "b")] {
            let op = OperatesEvent {
                id,
                addr: vec![0, id],
                name: name.into(),
            };
            t.record(ms(0), &TimelyEvent::Operates(op));
        }
        let log = [
            (0, schedule(1, StartStop::Start)),
            (1, schedule(2, StartStop::Start)),
            (4, schedule(2, StartStop::Stop)),
            (5, schedule(3, StartStop::Start)),
            (7, schedule(3, StartStop::Stop)),
            (7, schedule(3, StartStop::Start)),
            (9, schedule(3, StartStop::Stop)),
            (10, schedule(1, StartStop::Stop)),
            // A top-level operator after the region: nothing nests in it.
            (12, schedule(3, StartStop::Start)),
            (13, schedule(3, StartStop::Stop)),
        ];
        for (at, event) in &log {
            t.record(ms(*at), event);
        }
        assert_eq!(t.own[&1], (ms(3), 1));
        assert_eq!(t.own[&2], (ms(3), 1));
        assert_eq!(t.own[&3], (ms(5), 3));
        assert_eq!(t.last, ms(13));
        assert!(t.open.is_empty());
        let report = OperatorTimes {
            totals: Rc::new(RefCell::new(t)),
            worker: 0,
        }
        .report();
        let rows: Vec<&str> = report.lines().collect();
        assert_eq!(
            rows[0],
            "operator times, worker 0: 0.013 s logged, 0.011 s in operators"
        );
        assert!(rows[1].ends_with("b (#3)"), "longest first: {report}");
        assert_eq!(rows.len(), 4, "{report}");
    }
}
