//! `Written`: which ranges of a disk a writer has written (`data`) or
//! zeroed (`zero`), later writes replacing earlier ones. `receive` keeps one
//! for the push it serves; a partial push replays its journal into one.

use std::collections::BTreeMap;

use crate::model::extent::{coalesce, ByteRange, Extent, ExtentKind};

/// Disjoint entries keyed by start: `start -> (end, kind)`.
#[derive(Debug, Default, Clone)]
pub struct Written(BTreeMap<u64, (u64, ExtentKind)>);

impl Written {
    pub fn insert(&mut self, r: ByteRange, kind: ExtentKind) {
        if r.is_empty() {
            return;
        }
        let (start, end) = (r.offset, r.end());
        let overlapping: Vec<(u64, (u64, ExtentKind))> = self
            .0
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, v)| (*s, *v))
            .collect();
        for (s, (e, k)) in overlapping {
            self.0.remove(&s);
            if s < start {
                self.0.insert(s, (start, k));
            }
            if e > end {
                self.0.insert(end, (e, k));
            }
        }
        self.0.insert(start, (end, kind));
    }

    /// Sorted, coalesced extents.
    pub fn extents(&self) -> Vec<Extent> {
        coalesce(
            self.0
                .iter()
                .map(|(s, (e, k))| Extent::new(ByteRange::from_bounds(*s, *e), *k)),
        )
    }

    /// Entries intersecting `r`, clipped (disjoint, sorted).
    pub fn within(&self, r: ByteRange) -> Vec<(ByteRange, ExtentKind)> {
        let first = self
            .0
            .range(..=r.offset)
            .next_back()
            .map_or(r.offset, |(s, _)| *s);
        self.0
            .range(first..r.end())
            .filter_map(|(s, (e, k))| {
                ByteRange::from_bounds(*s, *e)
                    .intersect(&r)
                    .map(|x| (x, *k))
            })
            .collect()
    }

    /// Bytes of each kind: (data, zero).
    pub fn totals(&self) -> (u64, u64) {
        self.0.iter().fold((0, 0), |(d, z), (s, (e, k))| match k {
            ExtentKind::Data => (d + e - s, z),
            ExtentKind::Zero => (d, z + e - s),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_writes_override() {
        let triples = |w: &Written| -> Vec<(u64, u64, ExtentKind)> {
            w.extents()
                .iter()
                .map(|e| (e.offset, e.length, e.kind))
                .collect()
        };
        let mut w = Written::default();
        w.insert(ByteRange::new(0, 100), ExtentKind::Data);
        w.insert(ByteRange::new(40, 20), ExtentKind::Zero);
        w.insert(ByteRange::new(90, 30), ExtentKind::Data);
        assert_eq!(
            triples(&w),
            vec![
                (0, 40, ExtentKind::Data),
                (40, 20, ExtentKind::Zero),
                (60, 60, ExtentKind::Data)
            ]
        );
        assert_eq!(w.totals(), (100, 20));
        w.insert(ByteRange::new(10, 100), ExtentKind::Zero);
        assert_eq!(
            triples(&w),
            vec![
                (0, 10, ExtentKind::Data),
                (10, 100, ExtentKind::Zero),
                (110, 10, ExtentKind::Data)
            ]
        );
        assert_eq!(
            w.within(ByteRange::new(5, 10)),
            vec![
                (ByteRange::new(5, 5), ExtentKind::Data),
                (ByteRange::new(10, 5), ExtentKind::Zero)
            ]
        );
        w.insert(ByteRange::new(500, 0), ExtentKind::Data);
        assert_eq!(w.totals(), (20, 100));
    }
}
