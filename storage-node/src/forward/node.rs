//! The primary's side of the forward link, wired to this node's resources and portal.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use iscsi_target::driver::Registry;
use iscsi_target::remote::{ForwardError, ForwardReply, ForwardRequest};
use iscsi_target::scsi::pr::Nexus;

use super::ForwardTarget;
use crate::host::Host;
use crate::lun::ResourceLun;

/// Runs forwarded requests on the logical units of this node's portal, with the portal's
/// device locks.
pub struct NodeForwardTarget {
    pub host: Arc<Host>,
    pub portal: Arc<iscsi_target::Config<ResourceLun>>,
    pub registry: Arc<Registry>,
}

impl ForwardTarget for NodeForwardTarget {
    fn authorize(&self, resource: &str, node: &str, node_id: u8) -> Result<String, String> {
        let slot =
            self.host.slot(resource).ok_or_else(|| format!("no resource {resource} here"))?;
        if !slot.primary.load(Ordering::Acquire) {
            return Err(format!("{resource}: this node is not its Primary"));
        }
        let plan = slot.plan()?;
        if plan.peer_names.get(&node_id).map(String::as_str) != Some(node) {
            return Err(format!("{resource}: {node} is not its peer with node-id {node_id}"));
        }
        Ok(self.host.target_name(resource))
    }

    async fn execute(&self, request: ForwardRequest) -> Result<ForwardReply, ForwardError> {
        iscsi_target::driver::execute_forwarded(&self.portal, &self.registry, request).await
    }

    fn nexuses_lost(&self, lost: &[(String, Nexus)]) {
        self.portal.remote_nexuses_lost(lost);
    }
}
