package container

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestStartError(t *testing.T) {
	for _, tc := range []struct {
		msg  string // runc's log entry
		want string
		is   error
	}{
		{`runc run failed: unable to start container process: exec: "foo": executable file not found in $PATH`,
			`exec "foo": executable file not found in $PATH`, ErrCommandNotFound},
		{`runc run failed: unable to start container process: exec: "/nonexistent": stat /nonexistent: no such file or directory`,
			`exec "/nonexistent": stat /nonexistent: no such file or directory`, ErrCommandNotFound},
		{`runc run failed: unable to start container process: exec: "/etc/noexec": permission denied`,
			`exec "/etc/noexec": permission denied`, ErrCommandNotExecutable},
		// runc 1.2 and 1.0 wrap the same reason differently.
		{`runc run failed: unable to start container process: error during container init: exec: "foo": executable file not found in $PATH`,
			`exec "foo": executable file not found in $PATH`, ErrCommandNotFound},
		{`container_linux.go:380: starting container process caused: exec: "/etc": permission denied`,
			`exec "/etc": permission denied`, ErrCommandNotExecutable},
		{`runc run failed: unable to start container process: error during container init: error mounting "/src" to rootfs at "/dst": no such device`,
			`start container: error mounting "/src" to rootfs at "/dst": no such device`, nil},
	} {
		err := startError(tc.msg)
		if err.Error() != tc.want {
			t.Errorf("startError(%q) = %q, want %q", tc.msg, err, tc.want)
		}
		if tc.is != nil && !errors.Is(err, tc.is) {
			t.Errorf("startError(%q) is not %v", tc.msg, tc.is)
		}
		if tc.is == nil && (errors.Is(err, ErrCommandNotFound) || errors.Is(err, ErrCommandNotExecutable)) {
			t.Errorf("startError(%q) = %v, a missing command", tc.msg, err.Err)
		}
	}
}

func TestRuncErrors(t *testing.T) {
	log := `{"level":"warning","msg":"cgroup: something","time":"2026-12-03T08:46:01Z"}
not json
{"level":"error","msg":"runc run failed: one","time":"2026-12-03T08:46:01Z"}
{"level":"fatal","msg":"two","time":"2026-12-03T08:46:01Z"}
`
	got := runcErrors(strings.NewReader(log))
	if strings.Join(got, "|") != "runc run failed: one|two" {
		t.Fatalf("runcErrors = %q", got)
	}
}

// TestRuncStderr: the container's output passes unchanged; the line runc
// prints for an error it also logged does not.
func TestRuncStderr(t *testing.T) {
	log := filepath.Join(t.TempDir(), "runc.log")
	var out strings.Builder
	w := &runcStderr{w: &out, log: log}
	write := func(s string) {
		t.Helper()
		if n, err := w.Write([]byte(s)); n != len(s) || err != nil {
			t.Fatalf("Write(%q) = %d, %v", s, n, err)
		}
	}
	write("before the log exists\n")
	write("partial ")
	const msg = `runc run failed: unable to start container process: exec: "foo": executable file not found in $PATH`
	if err := os.WriteFile(log, []byte(`{"level":"error","msg":"`+strings.ReplaceAll(msg, `"`, `\"`)+`"}`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	write("line\n")
	write("the container says: " + msg + "\n") // not alone on its line
	write(msg + "\n")
	want := "before the log exists\npartial line\nthe container says: " + msg + "\n"
	if out.String() != want {
		t.Fatalf("passed on %q, want %q", out.String(), want)
	}
}
