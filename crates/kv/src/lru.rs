//! An intrusive doubly linked list over block indices: O(1) push to the
//! most-recent end, removal from anywhere, and pop of the least recent.
//! Links live in two flat arrays, so the list never allocates after creation.

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
    linked: bool,
}

pub(crate) struct LruList {
    links: Vec<Link>,
    head: u32,
    tail: u32,
    len: usize,
}

impl LruList {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { links: vec![Link { prev: NIL, next: NIL, linked: false }; capacity], head: NIL, tail: NIL, len: 0 }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn contains(&self, i: u32) -> bool {
        self.links[i as usize].linked
    }

    /// Makes `i` the most recently used. `i` must not be linked.
    pub(crate) fn push_back(&mut self, i: u32) {
        debug_assert!(!self.links[i as usize].linked, "block linked twice into the LRU");
        self.links[i as usize] = Link { prev: self.tail, next: NIL, linked: true };
        if self.tail == NIL {
            self.head = i;
        } else {
            self.links[self.tail as usize].next = i;
        }
        self.tail = i;
        self.len += 1;
    }

    /// Unlinks `i`; a no-op if it is not linked.
    pub(crate) fn remove(&mut self, i: u32) {
        let link = self.links[i as usize];
        if !link.linked {
            return;
        }
        if link.prev == NIL {
            self.head = link.next;
        } else {
            self.links[link.prev as usize].next = link.next;
        }
        if link.next == NIL {
            self.tail = link.prev;
        } else {
            self.links[link.next as usize].prev = link.prev;
        }
        self.links[i as usize] = Link { prev: NIL, next: NIL, linked: false };
        self.len -= 1;
    }

    /// Unlinks and returns the least recently used.
    pub(crate) fn pop_front(&mut self) -> Option<u32> {
        let head = self.head;
        if head == NIL {
            return None;
        }
        self.remove(head);
        Some(head)
    }

    /// Least recent first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            (cur != NIL).then(|| {
                let i = cur;
                cur = self.links[i as usize].next;
                i
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_recency_order() {
        let mut l = LruList::new(8);
        for i in [3, 1, 4, 5] {
            l.push_back(i);
        }
        l.remove(4);
        l.remove(4);
        l.push_back(4);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![3, 1, 5, 4]);
        assert_eq!(l.pop_front(), Some(3));
        l.remove(4);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![1, 5]);
        assert_eq!(l.len(), 2);
        assert!(l.contains(5) && !l.contains(3));
        assert_eq!(l.pop_front(), Some(1));
        assert_eq!(l.pop_front(), Some(5));
        assert_eq!(l.pop_front(), None);
    }
}
