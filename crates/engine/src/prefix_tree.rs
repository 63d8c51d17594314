//! The prefix tree of a tenant's agents, as the web page draws it: the
//! shared system prompt branching into each agent's own history, every
//! branch with where its blocks are (pool, a tier, or nowhere).
//!
//! Built on the engine thread from the agents' block chains (their full
//! blocks' content hashes), one pass: a trie over the hashes, with each
//! block's place looked up once however many agents share it, then
//! compressed so that a node is a maximal run of blocks the same agents
//! share. Its size is the tenant's distinct blocks; at 1 Hz and 200 agents
//! it costs the engine well under a millisecond a second.

use std::collections::{BTreeMap, HashMap};

use kv::BlockHash;
use serde::Serialize;

use crate::request::AgentId;

/// Where a block is, for [`TreeNode::blocks`]: the pool, a tier by its
/// name, or [`NOWHERE`].
pub const NOWHERE: &str = "none";

/// A tenant's agents' prefix tree (module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PrefixTree {
    /// Tokens per block.
    pub block_size: usize,
    /// Nodes, parents before their children.
    pub nodes: Vec<TreeNode>,
}

/// A run of blocks the same agents share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TreeNode {
    /// Its index in [`PrefixTree::nodes`].
    pub id: usize,
    /// The node it continues; `None` for a root.
    pub parent: Option<usize>,
    /// Tokens before it.
    pub start: usize,
    /// Its tokens (whole blocks).
    pub tokens: usize,
    /// Agents whose history runs through it.
    pub agents: usize,
    /// Agents whose history ends in it.
    pub ends: Vec<AgentId>,
    /// Its blocks by place: `pool`, a tier's name, or `none`.
    pub blocks: BTreeMap<&'static str, usize>,
}

/// One block of the trie before compression.
struct Raw {
    parent: Option<usize>,
    place: &'static str,
    through: usize,
    ends: Vec<AgentId>,
    children: Vec<usize>,
}

/// Builds the tree of `agents` (id and block chain, in the order to draw
/// them); `place` gives each block's place, asked once per distinct block
/// with the agent and the indices of its chain not seen before.
pub(crate) fn build(
    block_size: usize,
    agents: &[(AgentId, &[BlockHash])],
    mut place: impl FnMut(usize, &[usize]) -> Vec<&'static str>,
) -> PrefixTree {
    let mut raw: Vec<Raw> = Vec::new();
    let mut index: HashMap<(Option<usize>, BlockHash), usize> = HashMap::new();
    for (a, (id, chain)) in agents.iter().enumerate() {
        // First the nodes this chain adds, so that their places are asked
        // in one batch.
        let (mut parent, mut path, mut new) = (None, Vec::with_capacity(chain.len()), Vec::new());
        for (i, &hash) in chain.iter().enumerate() {
            let node = *index.entry((parent, hash)).or_insert_with(|| {
                raw.push(Raw { parent, place: NOWHERE, through: 0, ends: Vec::new(), children: Vec::new() });
                let n = raw.len() - 1;
                if let Some(p) = parent {
                    raw[p].children.push(n);
                }
                new.push((i, n));
                n
            });
            path.push(node);
            parent = Some(node);
        }
        if !new.is_empty() {
            let indices: Vec<usize> = new.iter().map(|&(i, _)| i).collect();
            for ((_, n), p) in new.iter().zip(place(a, &indices)) {
                raw[*n].place = p;
            }
        }
        for &n in &path {
            raw[n].through += 1;
        }
        if let Some(&last) = path.last() {
            raw[last].ends.push(id.clone());
        }
    }
    compress(block_size, &raw)
}

/// Merges each run of blocks with a single child and no agent ending in it
/// into one node.
fn compress(block_size: usize, raw: &[Raw]) -> PrefixTree {
    let mut nodes: Vec<TreeNode> = Vec::new();
    // (first raw block of a node, its parent node, tokens before it)
    let mut todo: Vec<(usize, Option<usize>, usize)> =
        raw.iter().enumerate().filter(|(_, r)| r.parent.is_none()).map(|(i, _)| (i, None, 0)).collect();
    todo.reverse();
    while let Some((first, parent, start)) = todo.pop() {
        let mut blocks = BTreeMap::new();
        let mut at = first;
        let mut count = 1;
        *blocks.entry(raw[at].place).or_insert(0) += 1;
        while raw[at].ends.is_empty() && raw[at].children.len() == 1 {
            at = raw[at].children[0];
            count += 1;
            *blocks.entry(raw[at].place).or_insert(0) += 1;
        }
        let id = nodes.len();
        let tokens = count * block_size;
        nodes.push(TreeNode {
            id,
            parent,
            start,
            tokens,
            agents: raw[first].through,
            ends: raw[at].ends.clone(),
            blocks,
        });
        for &c in raw[at].children.iter().rev() {
            todo.push((c, Some(id), start + tokens));
        }
    }
    PrefixTree { block_size, nodes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    fn h(n: u64) -> BlockHash {
        BlockHash::from_u128(u128::from(n))
    }

    /// Three agents on one system prompt (two blocks), two of them sharing
    /// a third block: one root of 2 blocks, a node of 1 shared by two, and
    /// a leaf per agent; each distinct block's place asked once.
    #[test]
    fn shared_prefixes_become_one_node_and_places_are_asked_once() {
        let a = [h(1), h(2), h(3), h(4)];
        let b = [h(1), h(2), h(3), h(5), h(6)];
        let c = [h(1), h(2), h(7)];
        let agents = [(id("a"), &a[..]), (id("b"), &b[..]), (id("c"), &c[..])];
        let mut asked = 0;
        let tree = build(16, &agents, |agent, indices| {
            asked += indices.len();
            indices.iter().map(|&i| if agent == 1 && i == 4 { "disk" } else { "pool" }).collect()
        });
        assert_eq!(asked, 7, "one ask per distinct block");
        let shape: Vec<_> = tree
            .nodes
            .iter()
            .map(|n| {
                (n.parent, n.start, n.tokens, n.agents, n.ends.iter().map(ToString::to_string).collect::<Vec<_>>())
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (None, 0, 32, 3, vec![]),
                (Some(0), 32, 16, 2, vec![]),
                (Some(1), 48, 16, 1, vec!["a".to_string()]),
                (Some(1), 48, 32, 1, vec!["b".to_string()]),
                (Some(0), 32, 16, 1, vec!["c".to_string()]),
            ]
        );
        assert_eq!(tree.nodes[3].blocks, BTreeMap::from([("disk", 1), ("pool", 1)]));
    }

    /// An agent whose history is a prefix of another's ends inside the
    /// other's run, which splits there; agents without blocks are absent.
    #[test]
    fn an_agent_ending_inside_another_splits_its_run() {
        let long = [h(1), h(2), h(3)];
        let short = [h(1), h(2)];
        let agents = [(id("long"), &long[..]), (id("short"), &short[..]), (id("empty"), &[][..])];
        let tree = build(4, &agents, |_, i| vec![NOWHERE; i.len()]);
        assert_eq!(tree.nodes.len(), 2);
        assert_eq!((tree.nodes[0].tokens, tree.nodes[0].agents), (8, 2));
        assert_eq!(tree.nodes[0].ends, vec![id("short")]);
        assert_eq!((tree.nodes[1].parent, tree.nodes[1].tokens, tree.nodes[1].agents), (Some(0), 4, 1));
        assert_eq!(tree.nodes[1].blocks, BTreeMap::from([(NOWHERE, 1)]));
    }
}
