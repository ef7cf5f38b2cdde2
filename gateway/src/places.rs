//! Places counted per key, each given back when its holder is dropped, however the holder ends: how many
//! connections a client address holds (`server`), how many streams and waits a client holds (`waiters`).
//! One table for every per-client bound, so each bound is a key type and a maximum, not another map.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// How many places each key holds.
pub struct PerKey<K> {
    held: Mutex<HashMap<K, usize>>,
}

impl<K> Default for PerKey<K> {
    fn default() -> Self {
        Self {
            held: Mutex::new(HashMap::new()),
        }
    }
}

/// One place of one key; given back on drop.
pub struct Place<K: Eq + Hash> {
    table: Arc<PerKey<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> PerKey<K> {
    /// One more place for `key`, unless it holds `max` already.
    pub fn take(self: &Arc<Self>, key: &K, max: usize) -> Option<Place<K>> {
        // Held for a count's update only; a poisoned lock still holds valid counts.
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Place {
            table: self.clone(),
            key: key.clone(),
        })
    }

    /// Places `key` holds now.
    #[cfg(test)]
    pub fn held(&self, key: &K) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(key).copied().unwrap_or(0)
    }
}

impl<K: Eq + Hash> Drop for Place<K> {
    fn drop(&mut self) {
        let mut held = self.table.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_places_gets_them_back_on_drop_and_leaves_no_entry() {
        let table: Arc<PerKey<&str>> = Arc::default();
        let a = table.take(&"a", 2).unwrap();
        let _b = table.take(&"a", 2).unwrap();
        assert!(table.take(&"a", 2).is_none());
        assert!(table.take(&"other", 2).is_some(), "keys are counted apart");
        drop(a);
        assert_eq!(table.held(&"a"), 1);
        assert!(table.take(&"a", 2).is_some(), "a place given back is taken again");
        drop(_b);
        assert_eq!(table.held(&"a"), 0);
        assert!(
            table.held.lock().unwrap().is_empty(),
            "no entry is left for a key holding nothing"
        );
    }
}
