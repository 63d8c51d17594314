//! How far a stored prefix reaches when a model has several layer groups.
//!
//! A prefix cut after block `n` can be reused when every layer group has
//! what its layers will read: a full-attention group needs all of blocks
//! `0..n`; a sliding-window group needs only the blocks its window still
//! reaches from the cut, the last `w` before it (fewer at the start). So a
//! hybrid model (Gemma-3: five sliding layers to one full) can reuse a long
//! prefix whose early sliding-group blocks were never kept. [`chain_len`]
//! decides this for all groups in one pass over the candidate blocks; the
//! engine asks it with what each tier holds.

/// What one layer group needs of the blocks before a cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupRule {
    /// Every block before the cut.
    Full,
    /// The last `blocks` blocks before the cut (all of them for a cut
    /// within the first `blocks`).
    Window {
        /// Blocks the window reaches back: `ceil(window / block_size)`, plus
        /// one when the window need not start on a block boundary.
        blocks: usize,
    },
}

/// The longest cut `n <= max_blocks` at which every group `g` (with rule
/// `rules[g]`) has what it needs, where `has(g, i)` says whether block `i`
/// of group `g` is available.
pub fn chain_len(max_blocks: usize, rules: &[GroupRule], mut has: impl FnMut(usize, usize) -> bool) -> usize {
    // Full groups bound the cut by their first missing block.
    let mut limit = max_blocks;
    for (g, rule) in rules.iter().enumerate() {
        if *rule == GroupRule::Full {
            limit = (0..limit).find(|&i| !has(g, i)).unwrap_or(limit);
        }
    }
    // Window groups: the run of available blocks ending just before each cut.
    let runs: Vec<(usize, Vec<usize>)> = rules
        .iter()
        .enumerate()
        .filter_map(|(g, rule)| match rule {
            GroupRule::Window { blocks } => {
                let mut run = Vec::with_capacity(limit + 1);
                run.push(0);
                for i in 0..limit {
                    let prev = run[i];
                    run.push(if has(g, i) { prev + 1 } else { 0 });
                }
                Some((*blocks, run))
            }
            GroupRule::Full => None,
        })
        .collect();
    (0..=limit).rev().find(|&n| runs.iter().all(|(w, run)| run[n] >= n.min(*w))).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_group_stops_at_its_first_gap() {
        let held = [true, true, false, true];
        assert_eq!(chain_len(4, &[GroupRule::Full], |_, i| held[i]), 2);
        assert_eq!(chain_len(1, &[GroupRule::Full], |_, i| held[i]), 1);
        assert_eq!(chain_len(0, &[GroupRule::Full], |_, _| true), 0);
    }

    #[test]
    fn a_window_group_needs_only_the_blocks_before_the_cut() {
        // Sliding group kept only blocks 6..10 (the last window), full group all.
        let rules = [GroupRule::Window { blocks: 3 }, GroupRule::Full];
        let has = |g: usize, i: usize| g == 1 || (6..10).contains(&i);
        assert_eq!(chain_len(10, &rules, has), 10);
        // A cut at 8 needs sliding blocks 5..8, and 5 is gone; 9 needs 6..9: fine.
        assert_eq!(chain_len(9, &rules, has), 9);
        assert_eq!(chain_len(8, &rules, has), 0, "cuts 1..=8 all need a block before 6");
        // The full group bounds everything.
        let has = |g: usize, i: usize| if g == 1 { i < 7 } else { (4..10).contains(&i) };
        assert_eq!(chain_len(10, &rules, has), 7);
    }

    #[test]
    fn short_prefixes_need_every_block_of_a_window_group() {
        let rules = [GroupRule::Window { blocks: 4 }];
        assert_eq!(chain_len(4, &rules, |_, i| i != 0), 0, "cuts 1..=4 all need block 0");
        assert_eq!(chain_len(5, &rules, |_, i| i != 0), 5, "cut 5 needs 1..5, which are all there");
        assert_eq!(chain_len(6, &rules, |_, i| i != 0), 6);
    }
}
