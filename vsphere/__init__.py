"""vSphere through pyvmomi: vCenter/ESXi connections pinned by certificate fingerprint, discovery of VMs
and disks, the master-target prechecks, replica disks created on datastores and attached to the master
target VM, and the failover and failback steps (detach, reattach to the original VM, create a VM).

A library like proto/ and plumbing/: the process server's configuration service calls it (in a thread:
pyvmomi blocks), and nothing in it knows about replication."""
