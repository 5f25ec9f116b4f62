//! Observe, plan, apply, observe again: one pass's work on the backend — everything, or after a
//! change only the targets it touched — and what it leaves the next pass (its memory).

use std::collections::{BTreeMap, BTreeSet};

use super::report::{NodeReport, Pass, Unsettled};
use super::sessions::{self, Admitted, ReadAt};
use super::syncer::Syncer;
use crate::backend::{Backend, BackendError, Failures, Operation, Session};
use crate::desired::{DesiredState, Kind, ObjectKey, Problem, TargetConfig};
use crate::metrics::ErrorKind;

/// What the previous pass left for the next.
#[derive(Clone, Debug, Default)]
pub(super) struct Memory {
    targets: Option<Vec<TargetConfig>>,
    converged: bool,
    sessions: Vec<Session>,
    /// The UIDs of the grants declared then, for the sessions their ACLs admitted.
    grant_uids: BTreeMap<ObjectKey, String>,
    /// What the backend refused, by target IQN.
    refused: Vec<(String, Problem)>,
}

impl<B: Backend> Syncer<B> {
    /// Observe, plan, apply, observe again — everything, or, after a change, only the targets
    /// it touched (when the backend can, and the last pass converged) — and the sessions since.
    pub(super) async fn reconcile(
        &self,
        state: &DesiredState,
        report: &mut NodeReport,
        pass: Pass,
        partial: bool,
    ) {
        self.reconcile_targets(state, report, pass, partial).await;
        report.session_since = self.sessions.lock().since();
    }

    async fn reconcile_targets(
        &self,
        state: &DesiredState,
        report: &mut NodeReport,
        pass: Pass,
        partial: bool,
    ) {
        for target in &state.targets {
            for lun in &target.luns {
                report
                    .device_luns
                    .insert(lun.lun, self.backend.device_lun(lun.lun));
            }
        }
        let memory = self.memory.lock().clone();
        let scope = (pass == Pass::Changes && self.backend.scoped() && memory.converged)
            .then_some(memory.targets.as_ref())
            .flatten()
            .map(|before| changed_targets(before, &state.targets));
        let desired: Vec<TargetConfig> = match &scope {
            Some(iqns) => {
                tracing::debug!(targets = iqns.len(), "sync scoped to the changed targets");
                (state.targets.iter())
                    .filter(|t| iqns.contains(&t.iqn))
                    .cloned()
                    .collect()
            }
            None => state.targets.clone(),
        };
        report.scope = scope.clone();
        let observe = || async {
            let mut observed = match &scope {
                Some(iqns) if iqns.is_empty() => return None,
                Some(iqns) => self.backend.observe_scoped(&desired, iqns).await,
                None => self.backend.observe().await,
            };
            if partial && let Ok(observed) = &mut observed {
                self.backend.keep_undeclared(observed, &desired);
            }
            Some(observed)
        };

        let observed = match observe().await {
            // Nothing changed since a converged pass: nothing to read, nothing to do.
            None => {
                report.sessions = memory.sessions.clone();
                report
                    .problems
                    .extend(memory.refused.iter().map(|(_, p)| p.clone()));
                return;
            }
            Some(Ok(observed)) => observed,
            Some(Err(error)) => {
                self.metrics.error(ErrorKind::BackendObserve);
                report.unsettled.extend(desired.iter().map(|t| Unsettled {
                    target: Some(t.iqn.clone()),
                    initiator: None,
                    message: format!("{} backend: {error}", self.backend.name()),
                }));
                report.sessions = last_seen(&memory, scope.as_ref());
                self.remember(state, report, &memory, scope.as_ref(), Vec::new());
                return;
            }
        };
        // Sessions before anything changes, admitted by what the last pass declared: one a
        // revocation ends is told as begun too, with its grant.
        let before = self.backend.sessions(&observed);
        let admitted = match &memory.targets {
            Some(targets) => Admitted {
                targets,
                uids: &memory.grant_uids,
            },
            None => Admitted {
                targets: &state.targets,
                uids: &report.grant_uids,
            },
        };
        self.read_sessions(&admitted, &before, scope.as_ref(), &report.node);
        let plan = self.backend.plan(&desired, &observed);
        self.apply(&plan.ops, report).await;
        report.problems.extend(plan.refused.iter().cloned());
        let refused = plan
            .refused
            .into_iter()
            .map(|problem| (refused_target(&desired, &problem), problem))
            .collect();
        let after = if plan.ops.is_empty() {
            // Nothing was changed: what was observed is what holds.
            Ok(observed)
        } else {
            observe()
                .await
                .unwrap_or_else(|| Err(BackendError::Unreachable("nothing to observe".into())))
        };
        if self.check_converged(&desired, after, report) {
            let admitted = Admitted {
                targets: &state.targets,
                uids: &report.grant_uids,
            };
            self.read_sessions(&admitted, &report.sessions, scope.as_ref(), &report.node);
        } else {
            // Unread after applying: the sessions as this pass first read them.
            report.sessions = before.clone();
        }
        if scope.is_none() && pass == Pass::Changes && memory.converged {
            // A backend read whole: what the pass left as it was keeps its status.
            let readings = [memory.sessions.as_slice(), &before, &report.sessions];
            let touched = (memory.targets.as_ref()).and_then(|then| {
                touched(
                    then,
                    &state.targets,
                    &plan.ops,
                    &readings,
                    &report.unsettled,
                )
            });
            report.scope = touched;
        }
        self.remember(state, report, &memory, scope.as_ref(), refused);
    }

    /// Applies a plan in its order. After a failure, what builds on it would build on a missing
    /// step and is left out; revocations still run.
    async fn apply(&self, ops: &[B::Op], report: &mut NodeReport) {
        let mut failures = Failures::default();
        for op in ops {
            if !failures.admit(op) {
                continue;
            }
            tracing::info!(backend = self.backend.name(), "{op}");
            let applied = self.backend.apply(op).await;
            self.metrics
                .backend_operation(self.backend.name(), applied.is_ok());
            if let Err(error) = applied {
                tracing::warn!(backend = self.backend.name(), %error, "{op} failed");
                failures.record(op);
                report.unsettled.push(Unsettled {
                    target: op.target().map(str::to_owned),
                    initiator: op.initiator().map(str::to_owned),
                    message: error.to_string(),
                });
            }
        }
    }

    /// What the backend holds after applying: whatever a new plan would still do did not
    /// converge (unless it already failed); the sessions are what it holds now. False when the
    /// backend could not be read (and the sessions were not).
    fn check_converged(
        &self,
        desired: &[TargetConfig],
        after: Result<B::Observed, BackendError>,
        report: &mut NodeReport,
    ) -> bool {
        let after = match after {
            Ok(after) => after,
            Err(error) => {
                report.unsettled.push(Unsettled {
                    target: None,
                    initiator: None,
                    message: format!("{} backend: {error}", self.backend.name()),
                });
                return false;
            }
        };
        for op in self.backend.plan(desired, &after).ops {
            let already = report.unsettled.iter().any(|u| {
                u.target.as_deref() == op.target() && u.initiator.as_deref() == op.initiator()
            });
            if !already {
                report.unsettled.push(Unsettled {
                    target: op.target().map(str::to_owned),
                    initiator: op.initiator().map(str::to_owned),
                    message: format!("not converged: {op}"),
                });
            }
        }
        report.sessions = self.backend.sessions(&after);
        true
    }

    /// Keeps what the next pass needs to scope itself: the targets as applied, whether they
    /// converged, and what the backend said of the targets this pass did not read — their
    /// sessions, and what it refused — which this pass reports as still true.
    fn remember(
        &self,
        state: &DesiredState,
        report: &mut NodeReport,
        before: &Memory,
        scope: Option<&BTreeSet<String>>,
        mut refused: Vec<(String, Problem)>,
    ) {
        if let Some(iqns) = scope {
            let kept = before
                .sessions
                .iter()
                .filter(|s| !iqns.contains(&s.target))
                .cloned();
            report.sessions.extend(kept);
            report.sessions.sort();
            let kept: Vec<(String, Problem)> = before
                .refused
                .iter()
                .filter(|(iqn, _)| !iqns.contains(iqn))
                .cloned()
                .collect();
            report.problems.extend(kept.iter().map(|(_, p)| p.clone()));
            refused.extend(kept);
        }
        *self.memory.lock() = Memory {
            targets: Some(state.targets.clone()),
            converged: report.unsettled.is_empty(),
            sessions: report.sessions.clone(),
            grant_uids: report.grant_uids.clone(),
            refused,
        };
    }

    /// A reading of the backend's sessions on the targets in `scope`, with what `admitted`
    /// them, into the book: what began or ended since the last reading is logged here and
    /// handed to whoever tells Events.
    fn read_sessions(
        &self,
        admitted: &Admitted<'_>,
        sessions: &[Session],
        scope: Option<&BTreeSet<String>>,
        node: &str,
    ) {
        let changes = (self.sessions.lock()).read(sessions, scope, admitted, ReadAt::now());
        for change in changes {
            sessions::log(node, &change);
            // Nobody listening (discus serve) is fine: the log line is the record.
            let _ = self.session_news.send(change);
        }
    }
}

/// The sessions of the targets a pass covers as the last pass that read them saw them: a backend
/// that cannot be read ended no session.
fn last_seen(memory: &Memory, scope: Option<&BTreeSet<String>>) -> Vec<Session> {
    (memory.sessions.iter())
        .filter(|s| scope.is_none_or(|iqns| iqns.contains(&s.target)))
        .cloned()
        .collect()
}

/// The IQN of the target a refusal is about: the target itself, or the one a grant applies to.
fn refused_target(targets: &[TargetConfig], problem: &Problem) -> String {
    targets
        .iter()
        .find(|t| match problem.kind {
            Kind::IscsiTarget => t.owner == problem.key,
            _ => t.acls.iter().any(|a| a.grant == problem.key),
        })
        .map(|t| t.iqn.clone())
        .unwrap_or_default()
}

/// The targets (IQNs) whose served state a pass over the whole backend may have changed since the
/// last converged one: declared differently, planned for, unsettled, or with other sessions in
/// any of the pass's readings (the last pass's, before applying, after). Every other target is as
/// that pass left it. `None` when an operation on what targets share (a portal, an account) may
/// have changed any of them.
fn touched<Op: Operation>(
    before: &[TargetConfig],
    now: &[TargetConfig],
    ops: &[Op],
    readings: &[&[Session]],
    unsettled: &[Unsettled],
) -> Option<BTreeSet<String>> {
    if ops.iter().any(|op| op.target().is_none()) {
        return None;
    }
    let mut touched = changed_targets(before, now);
    let named = (ops.iter().filter_map(Operation::target))
        .chain(unsettled.iter().filter_map(|u| u.target.as_deref()))
        .chain(
            readings
                .windows(2)
                .flat_map(|pair| sessions_changed(pair[0], pair[1])),
        );
    touched.extend(named.map(str::to_owned));
    Some(touched)
}

/// The targets whose sessions differ between two readings, counted: two sessions of one
/// initiator from one address (two portals, or iPXE's beside the system's) are two.
fn sessions_changed<'a>(then: &'a [Session], now: &'a [Session]) -> BTreeSet<&'a str> {
    let mut count: BTreeMap<&Session, i64> = BTreeMap::new();
    for session in then {
        *count.entry(session).or_default() += 1;
    }
    for session in now {
        *count.entry(session).or_default() -= 1;
    }
    (count.into_iter())
        .filter(|(_, n)| *n != 0)
        .map(|(session, _)| session.target.as_str())
        .collect()
}

/// The targets (IQNs) whose desired configuration differs between two passes, added and removed
/// ones included.
fn changed_targets(before: &[TargetConfig], now: &[TargetConfig]) -> BTreeSet<String> {
    let now: BTreeMap<&str, &TargetConfig> = now.iter().map(|t| (t.iqn.as_str(), t)).collect();
    let then: BTreeMap<&str, &TargetConfig> = before.iter().map(|t| (t.iqn.as_str(), t)).collect();
    now.keys()
        .chain(then.keys())
        .filter(|iqn| now.get(*iqn) != then.get(*iqn))
        .map(|iqn| (*iqn).to_owned())
        .collect()
}
