// vcsim: govmomi's vSphere API simulator as a program, for standby's tests (tests/vsphere) and for trying
// the vCenter commands by hand. Debian ships the simulator library (golang-github-vmware-govmomi-dev) but
// not govmomi's own vcsim program; this is the little we need of it.
//
// Build (offline, no module proxy): tools/vcsim/build.sh
//
// It serves the SOAP API over TLS on -l (default 127.0.0.1:0), prints one JSON line with its URL and
// certificate fingerprint on standard output (and to -info FILE if given), and runs until SIGTERM/SIGINT.
// Inventory: a vCenter (-esx: a standalone ESXi host) with -dc datacenters, -cluster clusters of -host
// hosts, -standalone-host hosts, -ds datastores and -vm VMs per resource pool. Nothing persists between runs.
package main

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func main() {
	listen := flag.String("l", "127.0.0.1:0", "listen address")
	esx := flag.Bool("esx", false, "simulate a standalone ESXi host instead of a vCenter")
	dc := flag.Int("dc", 1, "datacenters (vCenter only)")
	cluster := flag.Int("cluster", 1, "clusters per datacenter (vCenter only)")
	host := flag.Int("host", 3, "hosts per cluster (vCenter only)")
	standalone := flag.Int("standalone-host", 1, "standalone hosts per datacenter (vCenter only)")
	ds := flag.Int("ds", 1, "datastores")
	vm := flag.Int("vm", 2, "VMs per resource pool")
	user := flag.String("username", "", "the only user name accepted (default: any non-empty one)")
	pass := flag.String("password", "", "its password")
	certFile := flag.String("tlscert", "", "PEM certificate to serve (default: Go's built-in localhost certificate)")
	keyFile := flag.String("tlskey", "", "PEM key of -tlscert")
	info := flag.String("info", "", "also write the JSON line to this file")
	tools := flag.Bool("tools", true, "the VMs of the inventory report VMware Tools running (VMs created later do not)")
	vmfs := flag.Bool("vmfs", true, "the inventory's datastores report file system type VMFS (govmomi's default: OTHER)")
	flag.Parse()

	model := simulator.VPX()
	if *esx {
		model = simulator.ESX()
	} else {
		model.Datacenter = *dc
		model.Cluster = *cluster
		model.ClusterHost = *host
		model.Host = *standalone
	}
	model.Datastore = *ds
	model.Machine = *vm
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim: create inventory: %v", err)
	}
	defer model.Remove()
	// The simulator's datastores are local directories and its VMs run no guest: these two flags make
	// the inventory look like the hosts a master target runs on, and can be turned off to test refusals.
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm := e.(*simulator.VirtualMachine)
		if *tools && vm.Guest != nil {
			vm.Guest.ToolsRunningStatus = string(types.VirtualMachineToolsRunningStatusGuestToolsRunning)
			vm.Guest.ToolsStatus = types.VirtualMachineToolsStatusToolsOk
		}
	}
	for _, e := range simulator.Map.All("Datastore") {
		if *vmfs {
			e.(*simulator.Datastore).Summary.Type = string(types.HostFileSystemVolumeFileSystemTypeVMFS)
		}
	}

	model.Service.Listen = &url.URL{Host: *listen}
	if *user != "" {
		model.Service.Listen.User = url.UserPassword(*user, *pass)
	}
	conf := new(tls.Config)
	if *certFile != "" {
		pair, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("vcsim: load -tlscert/-tlskey: %v", err)
		}
		conf.Certificates = []tls.Certificate{pair}
	}
	model.Service.TLS = conf
	server := model.Service.NewServer()
	defer server.Close()

	der := server.Server.TLS.Certificates[0].Certificate[0]
	sum := sha256.Sum256(der)
	u := *server.URL
	u.User = nil
	line, _ := json.Marshal(map[string]string{
		"url":         u.String(),
		"host":        u.Host,
		"fingerprint": "sha256:" + strings.ToLower(fmt.Sprintf("%x", sum[:])),
	})
	fmt.Println(string(line))
	if *info != "" {
		if err := os.WriteFile(*info, append(line, '\n'), 0o644); err != nil {
			log.Fatalf("vcsim: write -info: %v", err)
		}
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
