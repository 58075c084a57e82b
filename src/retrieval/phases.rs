//! The search threads' barrier between quantizing a chunk of the corpus and reading it. Unlike
//! `std::sync::Barrier` it can be broken: a thread that panics breaks it (through its
//! [`Guard`]), and the threads waiting then panic too instead of waiting forever.

use std::sync::{Condvar, Mutex, PoisonError};

pub(crate) struct Phases {
    threads: usize,
    state: Mutex<State>,
    turned: Condvar,
}

struct State {
    arrived: usize,
    phase: u64,
    broken: bool,
}

const BROKEN: &str = "another search thread failed";

impl Phases {
    pub fn new(threads: usize) -> Phases {
        Phases {
            threads,
            state: Mutex::new(State {
                arrived: 0,
                phase: 0,
                broken: false,
            }),
            turned: Condvar::new(),
        }
    }

    /// Returns once all the threads have called it; panics if one of them failed.
    pub fn wait(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(!state.broken, "{BROKEN}");
        state.arrived += 1;
        if state.arrived == self.threads {
            state.arrived = 0;
            state.phase += 1;
            self.turned.notify_all();
            return;
        }
        let phase = state.phase;
        let state = self
            .turned
            .wait_while(state, |s| s.phase == phase && !s.broken)
            .unwrap_or_else(PoisonError::into_inner);
        assert!(state.phase != phase, "{BROKEN}");
    }

    /// Breaks the phases if the calling thread unwinds while holding it.
    pub fn guard(&self) -> Guard<'_> {
        Guard(self)
    }
}

pub(crate) struct Guard<'a>(&'a Phases);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.broken = true;
            self.0.turned.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No thread leaves a phase before all have arrived, over many phases.
    #[test]
    fn threads_leave_a_phase_together() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (phases, arrived) = (Phases::new(3), AtomicUsize::new(0));
        std::thread::scope(|scope| {
            for _ in 0..3 {
                scope.spawn(|| {
                    for phase in 1..=200 {
                        arrived.fetch_add(1, Ordering::SeqCst);
                        phases.wait();
                        assert!(arrived.load(Ordering::SeqCst) >= 3 * phase);
                        phases.wait();
                    }
                });
            }
        });
        assert_eq!(arrived.load(Ordering::SeqCst), 600);
    }

    /// A thread that panics releases the ones waiting for it: they fail too, none hangs.
    #[test]
    fn a_failed_thread_breaks_the_wait() {
        let phases = Phases::new(2);
        let outcomes: Vec<bool> = std::thread::scope(|scope| {
            let waiting = scope.spawn(|| {
                let _guard = phases.guard();
                phases.wait();
            });
            let failing = scope.spawn(|| {
                let _guard = phases.guard();
                std::thread::sleep(std::time::Duration::from_millis(20));
                panic!("failed on purpose");
            });
            [waiting.join().is_err(), failing.join().is_err()].into()
        });
        assert_eq!(outcomes, [true, true]);
    }
}
