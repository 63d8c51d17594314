//! Owners (agents or tenants): how many distinct blocks each holds, and its
//! optional quota.
//!
//! An owner *holds* a block while any of its sequences or raw allocations
//! references it; a block shared by two sequences of one owner counts once,
//! a block shared by two owners counts for both (each keeps it alive). Forks
//! therefore cost their owner nothing, and a quota bounds what an owner can
//! pin. Entries are interned to small slots so block holder lists stay
//! compact; an entry with nothing held, no sequence and no quota is dropped so
//! short-lived owners do not accumulate.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::OwnerId;

/// Interned index of an owner inside one cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct OwnerSlot(u32);

struct OwnerEntry {
    id: OwnerId,
    quota: Option<u32>,
    held: u32,
    sequences: u32,
}

/// What one owner holds, as reported by `KvCache::owner_usage`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerUsage {
    /// Distinct blocks it holds.
    pub held_blocks: u32,
    /// Its quota, if any.
    pub quota: Option<u32>,
    /// Live sequences it owns.
    pub sequences: u32,
}

#[derive(Default)]
pub(crate) struct OwnerTable {
    entries: Vec<Option<OwnerEntry>>,
    by_id: HashMap<OwnerId, OwnerSlot>,
    vacant: Vec<u32>,
}

impl OwnerTable {
    pub(crate) fn find(&self, id: &OwnerId) -> Option<OwnerSlot> {
        self.by_id.get(id).copied()
    }

    pub(crate) fn intern(&mut self, id: &OwnerId) -> OwnerSlot {
        if let Some(slot) = self.find(id) {
            return slot;
        }
        let entry = OwnerEntry { id: id.clone(), quota: None, held: 0, sequences: 0 };
        let slot = match self.vacant.pop() {
            Some(i) => {
                self.entries[i as usize] = Some(entry);
                OwnerSlot(i)
            }
            None => {
                self.entries.push(Some(entry));
                OwnerSlot((self.entries.len() - 1) as u32)
            }
        };
        self.by_id.insert(id.clone(), slot);
        slot
    }

    fn entry(&self, slot: OwnerSlot) -> &OwnerEntry {
        self.entries[slot.0 as usize].as_ref().expect("owner slots are only handed out for live entries")
    }

    fn entry_mut(&mut self, slot: OwnerSlot) -> &mut OwnerEntry {
        self.entries[slot.0 as usize].as_mut().expect("owner slots are only handed out for live entries")
    }

    pub(crate) fn id(&self, slot: OwnerSlot) -> &OwnerId {
        &self.entry(slot).id
    }

    /// Fails unless `slot` may take `extra` more blocks.
    pub(crate) fn check_quota(&self, slot: OwnerSlot, extra: usize) -> Result<()> {
        let e = self.entry(slot);
        match e.quota {
            Some(quota) if u64::from(e.held) + extra as u64 > u64::from(quota) => Err(Error::QuotaExceeded {
                owner: e.id.clone(),
                quota,
                held: e.held,
                requested: u32::try_from(extra).unwrap_or(u32::MAX),
            }),
            _ => Ok(()),
        }
    }

    pub(crate) fn started_holding(&mut self, slot: OwnerSlot) {
        self.entry_mut(slot).held += 1;
    }

    pub(crate) fn stopped_holding(&mut self, slot: OwnerSlot) {
        let e = self.entry_mut(slot);
        debug_assert!(e.held > 0, "owner held-count underflow");
        e.held = e.held.saturating_sub(1);
    }

    pub(crate) fn sequence_created(&mut self, slot: OwnerSlot) {
        self.entry_mut(slot).sequences += 1;
    }

    pub(crate) fn sequence_removed(&mut self, slot: OwnerSlot) {
        let e = self.entry_mut(slot);
        debug_assert!(e.sequences > 0, "owner sequence-count underflow");
        e.sequences = e.sequences.saturating_sub(1);
    }

    /// Drops the entry if nothing refers to it any more.
    pub(crate) fn release_if_idle(&mut self, slot: OwnerSlot) {
        let idle = matches!(&self.entries[slot.0 as usize],
            Some(e) if e.held == 0 && e.sequences == 0 && e.quota.is_none());
        if idle {
            if let Some(e) = self.entries[slot.0 as usize].take() {
                self.by_id.remove(&e.id);
                self.vacant.push(slot.0);
            }
        }
    }

    pub(crate) fn set_quota(&mut self, id: &OwnerId, quota: Option<u32>) {
        let slot = self.intern(id);
        self.entry_mut(slot).quota = quota;
        self.release_if_idle(slot);
    }

    pub(crate) fn usage(&self, id: &OwnerId) -> OwnerUsage {
        self.find(id).map_or_else(OwnerUsage::default, |slot| {
            let e = self.entry(slot);
            OwnerUsage { held_blocks: e.held, quota: e.quota, sequences: e.sequences }
        })
    }

    /// Live slots with their (held, sequences) counts, for invariant checks.
    pub(crate) fn live(&self) -> impl Iterator<Item = (OwnerSlot, u32, u32)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (OwnerSlot(i as u32), e.held, e.sequences)))
    }

    pub(crate) fn is_live(&self, slot: OwnerSlot) -> bool {
        matches!(self.entries.get(slot.0 as usize), Some(Some(_)))
    }
}
