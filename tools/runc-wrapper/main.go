// Command runc-wrapper lets dockerd run privileged containers on the test machines, whose
// capability bounding set lacks CAP_SYS_RESOURCE and whose open-files hard limit is 20000:
// runc fails there with "unable to apply caps" or "error setting rlimit". Before it execs the
// real runc, it removes from the bundle's config.json the capabilities the bounding set does not
// have, and lowers rlimits to the hard limits this process has. Nothing else changes.
//
// The tests start dockerd with --add-runtime/--default-runtime pointing here
// (tests/support/docker.rs); the real runc is $DISCUS_REAL_RUNC, else /usr/sbin/runc.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// The capabilities by number, as the kernel (linux/capability.h) numbers them.
var capabilities = []string{
	"CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
	"SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
	"IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
	"SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
	"LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
	"WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
}

var rlimits = map[string]int{
	"RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4,
	"RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9,
	"RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11, "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13,
	"RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}

func main() {
	if bundle := bundleOf(os.Args[1:]); bundle != "" {
		if err := adjust(filepath.Join(bundle, "config.json")); err != nil {
			fmt.Fprintf(os.Stderr, "runc-wrapper: %v\n", err)
			os.Exit(1)
		}
	}
	runc := os.Getenv("DISCUS_REAL_RUNC")
	if runc == "" {
		runc = "/usr/sbin/runc"
	}
	err := syscall.Exec(runc, append([]string{runc}, os.Args[1:]...), os.Environ())
	fmt.Fprintf(os.Stderr, "runc-wrapper: cannot run %s: %v\n", runc, err)
	os.Exit(1)
}

// bundleOf finds the value of --bundle (or -b) in runc's arguments.
func bundleOf(args []string) string {
	for i, arg := range args {
		switch {
		case (arg == "--bundle" || arg == "-b") && i+1 < len(args):
			return args[i+1]
		case strings.HasPrefix(arg, "--bundle="):
			return strings.TrimPrefix(arg, "--bundle=")
		}
	}
	return ""
}

func adjust(path string) error {
	text, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var config map[string]interface{}
	if err := json.Unmarshal(text, &config); err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	process, _ := config["process"].(map[string]interface{})
	if process == nil {
		return nil
	}
	bounding, err := boundingSet()
	if err != nil {
		return err
	}
	if caps, ok := process["capabilities"].(map[string]interface{}); ok {
		for set, list := range caps {
			names, _ := list.([]interface{})
			kept := []interface{}{}
			for _, name := range names {
				if s, ok := name.(string); ok && bounding[strings.TrimPrefix(s, "CAP_")] {
					kept = append(kept, name)
				}
			}
			caps[set] = kept
		}
	}
	if limits, ok := process["rlimits"].([]interface{}); ok {
		for _, entry := range limits {
			clamp(entry)
		}
	}
	out, err := json.Marshal(config)
	if err != nil {
		return err
	}
	return os.WriteFile(path, out, 0o600)
}

// clamp lowers one rlimit of config.json to the hard limit this process has.
func clamp(entry interface{}) {
	limit, _ := entry.(map[string]interface{})
	kind, _ := limit["type"].(string)
	resource, known := rlimits[kind]
	var current syscall.Rlimit
	if !known || syscall.Getrlimit(resource, &current) != nil {
		return
	}
	for _, field := range []string{"hard", "soft"} {
		if value, ok := limit[field].(float64); ok && uint64(value) > current.Max {
			limit[field] = current.Max
		}
	}
}

// boundingSet reads the capabilities this process may have (CapBnd of /proc/self/status).
func boundingSet() (map[string]bool, error) {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if hex, ok := strings.CutPrefix(line, "CapBnd:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
			if err != nil {
				return nil, fmt.Errorf("CapBnd: %v", err)
			}
			set := map[string]bool{}
			for number, name := range capabilities {
				if mask&(1<<uint(number)) != 0 {
					set[name] = true
				}
			}
			return set, nil
		}
	}
	return nil, fmt.Errorf("/proc/self/status has no CapBnd")
}
