//! A per-device budget for recording refused device-path requests, so that a flood of refused
//! enrollments cannot become a stream of synced audit writes.
//!
//! Every refused enrollment, renewal, certificate use or group-key request is still checked and
//! answered (0x87 and friends, PROTOCOL.md §3): the budget limits only what is *recorded* (the
//! audit entry, which costs a synced write, and the log line), never the answer, so a flood under
//! a device's ID does not lock the real device out. Each key has a token bucket; a refusal over
//! the budget is counted, and the next recorded refusal of that key says how many were left out.
//! Refusals of unregistered IDs (and of requests that name no device) share one key, so fresh
//! IDs do not buy fresh budgets; when the table is full, unknown keys share that key too.
//!
//! Sans-IO: the caller passes the time.
//!
//! # Usage
//! ```
//! use quva_ca::refusals::{Decision, RefusalBudget, RefusalKey};
//! let mut budget = RefusalBudget::new(2, 10_000, 1024);
//! let d1 = RefusalKey::Device("d1");
//! assert_eq!(budget.check(d1, 0), Decision::Record { left_out: 0 });
//! assert_eq!(budget.check(d1, 1), Decision::Record { left_out: 0 });
//! assert_eq!(budget.check(d1, 2), Decision::LeaveOut);
//! assert_eq!(budget.check(d1, 10_002), Decision::Record { left_out: 1 });
//! ```

use std::collections::HashMap;

/// Default burst of recorded refusals per key.
pub const DEFAULT_BURST: u32 = 8;
/// Default time to earn one more recorded refusal, ms (6 a minute once the burst is spent).
pub const DEFAULT_REFILL_MS: u64 = 10_000;
/// Default number of keys tracked at once.
pub const DEFAULT_MAX_KEYS: usize = 4096;

/// Whose budget a refusal is charged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKey<'a> {
    /// A registered device ID.
    Device(&'a str),
    /// An unregistered or unnamed device: one shared budget.
    Unregistered,
}

/// What to do with one refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write the audit entry and the log line; `left_out` refusals of this key were not recorded
    /// since the last recorded one.
    Record {
        /// Refusals left out before this one.
        left_out: u64,
    },
    /// Over the budget: answer, count, do not record.
    LeaveOut,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: u32,
    /// When the tokens were last topped up, ms.
    refilled_ms: u64,
    left_out: u64,
}

/// Token buckets of recorded refusals, by key.
#[derive(Debug)]
pub struct RefusalBudget {
    burst: u32,
    refill_ms: u64,
    max_keys: usize,
    buckets: HashMap<String, Bucket>,
    shared: Bucket,
}

impl Default for RefusalBudget {
    fn default() -> RefusalBudget {
        RefusalBudget::new(DEFAULT_BURST, DEFAULT_REFILL_MS, DEFAULT_MAX_KEYS)
    }
}

impl RefusalBudget {
    /// Buckets of `burst` recorded refusals, one more every `refill_ms`, for at most `max_keys`
    /// device IDs at once.
    pub fn new(burst: u32, refill_ms: u64, max_keys: usize) -> RefusalBudget {
        let burst = burst.max(1);
        RefusalBudget {
            burst,
            refill_ms: refill_ms.max(1),
            max_keys,
            buckets: HashMap::new(),
            shared: Bucket {
                tokens: burst,
                refilled_ms: 0,
                left_out: 0,
            },
        }
    }

    /// Charges one refusal of `key` at `now_ms`.
    pub fn check(&mut self, key: RefusalKey<'_>, now_ms: u64) -> Decision {
        let (burst, refill_ms) = (self.burst, self.refill_ms);
        let fresh = Bucket {
            tokens: burst,
            refilled_ms: now_ms,
            left_out: 0,
        };
        let bucket = match key {
            RefusalKey::Device(id) => {
                if !self.buckets.contains_key(id) && self.buckets.len() >= self.max_keys {
                    self.forget_idle(now_ms);
                }
                if self.buckets.contains_key(id) || self.buckets.len() < self.max_keys {
                    self.buckets.entry(id.to_owned()).or_insert(fresh)
                } else {
                    &mut self.shared
                }
            }
            RefusalKey::Unregistered => &mut self.shared,
        };
        take(bucket, burst, refill_ms, now_ms)
    }

    /// Refusals left out and not yet reported by a recorded one, over every key.
    pub fn left_out(&self) -> u64 {
        self.buckets.values().map(|b| b.left_out).sum::<u64>() + self.shared.left_out
    }

    /// Drops buckets that are full again and owe no report.
    fn forget_idle(&mut self, now_ms: u64) {
        let (burst, refill_ms) = (self.burst, self.refill_ms);
        self.buckets.retain(|_, b| {
            let earned = now_ms.saturating_sub(b.refilled_ms) / refill_ms;
            b.left_out > 0 || u64::from(b.tokens).saturating_add(earned) < u64::from(burst)
        });
    }
}

fn take(b: &mut Bucket, burst: u32, refill_ms: u64, now_ms: u64) -> Decision {
    let earned = now_ms.saturating_sub(b.refilled_ms) / refill_ms;
    if earned > 0 {
        let tokens = u64::from(b.tokens)
            .saturating_add(earned)
            .min(u64::from(burst));
        b.tokens = u32::try_from(tokens).unwrap_or(burst);
        b.refilled_ms = b
            .refilled_ms
            .saturating_add(earned.saturating_mul(refill_ms));
    }
    if b.tokens == 0 {
        b.left_out += 1;
        return Decision::LeaveOut;
    }
    if b.tokens == burst {
        // A full bucket earns nothing while it waits.
        b.refilled_ms = now_ms;
    }
    b.tokens -= 1;
    Decision::Record {
        left_out: std::mem::take(&mut b.left_out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(b: &mut RefusalBudget, key: RefusalKey<'_>, n: usize, now: u64) -> usize {
        (0..n)
            .filter(|_| matches!(b.check(key, now), Decision::Record { .. }))
            .count()
    }

    #[test]
    fn a_flood_under_one_id_records_only_the_burst() {
        let mut b = RefusalBudget::new(8, 10_000, 16);
        assert_eq!(recorded(&mut b, RefusalKey::Device("d1"), 1000, 0), 8);
        assert_eq!(b.left_out(), 992);
        // Other devices keep their own budget.
        assert_eq!(recorded(&mut b, RefusalKey::Device("d2"), 3, 0), 3);
    }

    #[test]
    fn the_budget_refills_and_the_next_record_reports_what_was_left_out() {
        let mut b = RefusalBudget::new(2, 1_000, 16);
        let k = RefusalKey::Device("d1");
        assert_eq!(recorded(&mut b, k, 5, 0), 2);
        assert_eq!(b.check(k, 999), Decision::LeaveOut);
        assert_eq!(b.check(k, 1_000), Decision::Record { left_out: 4 });
        assert_eq!(b.check(k, 1_001), Decision::LeaveOut);
        // A long pause refills up to the burst only.
        assert_eq!(recorded(&mut b, k, 10, 1_000_000), 2);
    }

    #[test]
    fn unregistered_ids_share_one_budget() {
        let mut b = RefusalBudget::new(3, 10_000, 16);
        assert_eq!(recorded(&mut b, RefusalKey::Unregistered, 100, 0), 3);
        assert_eq!(recorded(&mut b, RefusalKey::Device("d1"), 1, 0), 1);
    }

    #[test]
    fn a_full_table_sends_new_ids_to_the_shared_budget() {
        let mut b = RefusalBudget::new(1, 10_000, 2);
        assert_eq!(recorded(&mut b, RefusalKey::Device("a"), 1, 0), 1);
        assert_eq!(recorded(&mut b, RefusalKey::Device("b"), 1, 0), 1);
        // The table is full of busy keys: new ids share one bucket.
        let mut n = 0;
        for i in 0..100 {
            let id = format!("x{i}");
            n += recorded(&mut b, RefusalKey::Device(&id), 1, 0);
        }
        assert_eq!(n, 1);
        // Once the old keys are idle and full again, they make room.
        assert_eq!(recorded(&mut b, RefusalKey::Device("y"), 1, 20_000), 1);
    }
}
