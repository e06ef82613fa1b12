//! Chunks fetched ahead of their reader. A sequential reader of a pack
//! (restore, a mount's read-ahead, copy, verify) fetches a window of
//! several consecutive chunks in one ranged request; the chunks it did not
//! ask for wait here for the readers that will. A chunk is handed out once.
//! While one thread fetches a window, others asking for a chunk in it wait
//! for that request instead of making their own. The bytes kept are
//! bounded: past the budget the oldest windows' chunks are dropped (and
//! fetched again if asked for).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex};

use crate::model::chunk_id::ChunkId;

pub struct ReadAhead {
    state: Mutex<State>,
    arrived: Condvar,
    budget: usize,
}

#[derive(Default)]
struct State {
    ready: HashMap<ChunkId, Vec<u8>>,
    /// Ready chunks, oldest first (some may have been taken since).
    order: VecDeque<ChunkId>,
    bytes: usize,
    /// Chunks of windows being fetched.
    loading: HashSet<ChunkId>,
}

impl ReadAhead {
    pub fn new(budget: usize) -> Self {
        ReadAhead {
            state: Mutex::new(State::default()),
            arrived: Condvar::new(),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The chunk's stored bytes if a window brought them, waiting while a
    /// window that has it is on its way; `None` when no window has it.
    pub fn take(&self, id: &ChunkId) -> Option<Vec<u8>> {
        let mut st = self.lock();
        loop {
            if let Some(body) = st.ready.remove(id) {
                st.bytes -= body.len();
                return Some(body);
            }
            if !st.loading.contains(id) {
                return None;
            }
            st = self.arrived.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Claim the chunks a window will bring: the longest prefix of `ids`
    /// that nobody holds or fetches. 0 means the first is on its way or
    /// ready already: [`take`](Self::take) it.
    pub fn claim(&self, ids: &[ChunkId]) -> usize {
        let mut st = self.lock();
        let n = ids
            .iter()
            .take_while(|id| !st.loading.contains(id) && !st.ready.contains_key(id))
            .count();
        st.loading.extend(&ids[..n]);
        n
    }

    /// Hand over what a window brought and end the claim on `claimed`
    /// (chunks missing from `got` are simply not there: their readers
    /// fetch them themselves).
    pub fn fill(&self, claimed: &[ChunkId], got: Vec<(ChunkId, Vec<u8>)>) {
        let mut st = self.lock();
        for id in claimed {
            st.loading.remove(id);
        }
        for (id, body) in got {
            st.bytes += body.len();
            if let Some(old) = st.ready.insert(id, body) {
                st.bytes -= old.len();
            }
            st.order.push_back(id);
        }
        while st.bytes > self.budget {
            let Some(old) = st.order.pop_front() else {
                break;
            };
            if let Some(body) = st.ready.remove(&old) {
                st.bytes -= body.len();
            }
        }
        if st.order.len() > 4 * st.ready.len() + 64 {
            // Taken chunks leave their names behind: drop them now and then.
            let State { order, ready, .. } = &mut *st;
            order.retain(|id| ready.contains_key(id));
        }
        drop(st);
        self.arrived.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn a_window_serves_its_chunks_once() {
        let ra = ReadAhead::new(1 << 20);
        assert_eq!(ra.claim(&[id(1), id(2), id(3)]), 3);
        // Being fetched: nobody else claims them.
        assert_eq!(ra.claim(&[id(2)]), 0);
        ra.fill(
            &[id(1), id(2), id(3)],
            vec![(id(2), vec![2]), (id(3), vec![3])],
        );
        assert_eq!(ra.take(&id(2)), Some(vec![2]));
        assert_eq!(ra.take(&id(2)), None);
        assert_eq!(ra.take(&id(1)), None);
        // Ready already: not claimed again.
        assert_eq!(ra.claim(&[id(3), id(4)]), 0);
        assert_eq!(ra.claim(&[id(4), id(3)]), 1);
    }

    #[test]
    fn readers_wait_for_a_window_on_its_way() {
        let ra = ReadAhead::new(1 << 20);
        assert_eq!(ra.claim(&[id(1), id(2)]), 2);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| ra.take(&id(2)));
            // The waiter either waits or, if it runs after the fill, finds
            // the chunk ready: both end with the chunk.
            ra.fill(&[id(1), id(2)], vec![(id(2), vec![7; 10])]);
            assert_eq!(waiter.join().unwrap(), Some(vec![7; 10]));
        });
    }

    #[test]
    fn the_budget_drops_the_oldest() {
        let ra = ReadAhead::new(25);
        for n in 0..5u8 {
            assert_eq!(ra.claim(&[id(n)]), 1);
            ra.fill(&[id(n)], vec![(id(n), vec![n; 10])]);
        }
        assert_eq!(ra.take(&id(0)), None);
        assert_eq!(ra.take(&id(2)), None);
        assert_eq!(ra.take(&id(3)), Some(vec![3; 10]));
        assert_eq!(ra.take(&id(4)), Some(vec![4; 10]));
    }
}
