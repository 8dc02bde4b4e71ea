use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use respawn_core::ports::compute::{AllocateRequest, AllocationKey, Compute, Error, Vm, VmState};
use respawn_core::time::Timestamp;

use super::now_ms;

/// A provider of pretend VMs with a fixed number of slots. VMs are "running" as
/// soon as they are allocated; nothing runs on them.
#[derive(Debug)]
pub struct MemoryCompute {
    slots: usize,
    vms: Mutex<BTreeMap<AllocationKey, Vm>>,
}

impl MemoryCompute {
    pub fn new(slots: usize) -> Self {
        MemoryCompute {
            slots,
            vms: Mutex::new(BTreeMap::new()),
        }
    }

    /// VMs not yet terminated.
    pub fn live(&self) -> Vec<Vm> {
        self.lock()
            .values()
            .filter(|v| v.state != VmState::Terminated)
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<AllocationKey, Vm>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Compute for MemoryCompute {
    async fn allocate(&self, req: &AllocateRequest) -> Result<Vm, Error> {
        let mut vms = self.lock();
        if let Some(vm) = vms.get(&req.key) {
            return Ok(vm.clone());
        }
        let live = vms
            .values()
            .filter(|v| v.state != VmState::Terminated)
            .count();
        if live >= self.slots {
            return Err(Error::Capacity(format!("all {} slots busy", self.slots)));
        }
        let vm = Vm {
            id: format!("mem-{}-{}", req.key.job, req.key.attempt),
            key: req.key.clone(),
            state: VmState::Running,
            spot: req.placement.spot,
            nodes: req.resources.nodes,
            created_at: Timestamp(now_ms()),
        };
        vms.insert(req.key.clone(), vm.clone());
        Ok(vm)
    }

    async fn release(&self, key: &AllocationKey) -> Result<(), Error> {
        if let Some(vm) = self.lock().get_mut(key) {
            vm.state = VmState::Terminated;
        }
        Ok(())
    }

    async fn describe(&self, key: &AllocationKey) -> Result<Option<Vm>, Error> {
        Ok(self.lock().get(key).cloned())
    }

    async fn list(&self) -> Result<Vec<Vm>, Error> {
        Ok(self.lock().values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conformance() {
        respawn_core::conformance::compute::run(&super::MemoryCompute::new(2)).await;
    }
}
