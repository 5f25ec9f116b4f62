//! What the phases share: each wanted target as placed in tgtd (found, or to be made), and the
//! changes to the daemon's accounts — and the questions the phases ask of them.

use std::collections::{BTreeMap, BTreeSet};

use super::wanted::Wanted;
use crate::backend::tgt::model::TgtTarget;

/// One target's part of the plan: its id, what it holds now, and what it must hold.
pub(super) struct Placed<'a> {
    pub(super) tid: u32,
    pub(super) found: Option<&'a TgtTarget>,
    pub(super) wanted: &'a Wanted<'a>,
    /// The initiators it admits once the plan is applied.
    pub(super) admitted: BTreeSet<&'a str>,
}

impl Placed<'_> {
    pub(super) fn iqn(&self) -> String {
        self.wanted.target.iqn.clone()
    }

    pub(super) fn found(&self) -> &TgtTarget {
        static EMPTY: TgtTarget = TgtTarget {
            tid: 0,
            name: String::new(),
            state: String::new(),
            sessions: Vec::new(),
            luns: Vec::new(),
            accounts: Vec::new(),
            outgoing_account: None,
            acls: Vec::new(),
            address_acls: Vec::new(),
        };
        self.found.unwrap_or(&EMPTY)
    }

    pub(super) fn bound_in(&self, user: &str) -> bool {
        self.found().accounts.iter().any(|a| a == user)
    }

    /// Incoming accounts to bind that exist with the right password and are not bound yet.
    pub(super) fn early_in<'b>(
        &'b self,
        changes: &'b AccountChanges,
    ) -> impl Iterator<Item = &'b String> {
        self.wanted
            .accounts
            .incoming
            .iter()
            .filter(|u| changes.usable(u) && !changes.recreated.contains(*u) && !self.bound_in(u))
    }

    /// The first of the bound incoming accounts (in tgt's slot order) that must go.
    pub(super) fn first_gone(&self, changes: &AccountChanges) -> Option<usize> {
        self.found().accounts.iter().position(|u| {
            !self.wanted.accounts.incoming.contains(u) || changes.recreated.contains(u)
        })
    }

    /// The incoming accounts bound at every instant of the plan: those before the first that
    /// must go (the rest are unbound and bound again, see `unbind_accounts`).
    pub(super) fn kept_throughout(&self, changes: &AccountChanges) -> &[String] {
        let accounts = &self.found().accounts;
        &accounts[..self.first_gone(changes).unwrap_or(accounts.len())]
    }

    /// Whether, while accounts change, the target could be left with no incoming account while
    /// initiators are admitted — in tgt, a target without accounts admits without CHAP. Its
    /// ACLs are then unbound first and bound again once the accounts are in place; their
    /// sessions go on.
    pub(super) fn exposed(&self, changes: &AccountChanges) -> bool {
        self.wanted.target.chap_required && self.kept_throughout(changes).is_empty()
    }
}

/// How the daemon's CHAP accounts must change, decided once for every target.
#[derive(Default)]
pub(super) struct AccountChanges {
    /// Wanted accounts that do not exist yet: created before anything binds them.
    pub(super) fresh: BTreeSet<String>,
    /// Wanted accounts that exist with another (or an unknown) password: unbound everywhere,
    /// deleted and created again (tgt has no way to change a password in place).
    pub(super) recreated: BTreeSet<String>,
    /// Accounts discus made that nothing wants any more.
    pub(super) stale: BTreeSet<String>,
    /// Wanted accounts discus cannot use: made by someone else, or bound to a target discus did
    /// not make (so that discus cannot unbind it to change its password). Grant → why.
    pub(super) unusable: BTreeMap<String, String>,
}

impl AccountChanges {
    pub(super) fn usable(&self, user: &str) -> bool {
        !self.unusable.contains_key(user)
    }
}
