// Command argo-health runs an Argo CD health check (a Lua script) on one object, the way Argo
// CD's application controller does: gopher-lua (the interpreter Argo CD embeds), the object as
// the global `obj` (JSON decoded into Lua tables), only the base, package and table libraries
// (what Argo CD opens for checks configured in argocd-cm), a one-second limit, and a returned
// status that must be one Argo CD knows, else Unknown.
//
// Usage: argo-health SCRIPT.lua < object.json; prints {"status": ..., "message": ...}.
// discus's tests feed it the test cases of deploy/argocd/ (tests/chart.rs).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
)

type health struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

var known = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true,
	"Suspended": true, "Missing": true, "Unknown": true,
}

func main() {
	if len(os.Args) != 2 {
		fail("usage: argo-health SCRIPT.lua < object.json")
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		fail("cannot read the script: %v", err)
	}
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("cannot read the object from stdin: %v", err)
	}
	var object map[string]interface{}
	if err := json.Unmarshal(input, &object); err != nil {
		fail("the object on stdin is not a JSON object: %v", err)
	}
	result, err := run(string(script), object)
	if err != nil {
		fail("%s: %v", os.Args[1], err)
	}
	out, _ := json.Marshal(result)
	fmt.Println(string(out))
}

func run(script string, object map[string]interface{}) (health, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for name, open := range map[string]lua.LGFunction{
		lua.LoadLibName: lua.OpenPackage,
		lua.BaseLibName: lua.OpenBase,
		lua.TabLibName:  lua.OpenTable,
	} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(open), Protect: true}, lua.LString(name)); err != nil {
			return health{}, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, object))
	if err := l.DoString(script); err != nil {
		return health{}, err
	}
	table, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return health{}, fmt.Errorf("the script returned %s, not a table", l.Get(-1).Type())
	}
	result := health{
		Status:  lua.LVAsString(table.RawGetString("status")),
		Message: lua.LVAsString(table.RawGetString("message")),
	}
	if !known[result.Status] {
		// What Argo CD makes of a status it does not know.
		return health{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return result, nil
}

// toLua converts decoded JSON into Lua values as Argo CD does: objects and arrays become tables
// (arrays indexed from 1), numbers LNumber.
func toLua(l *lua.LState, value interface{}) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []interface{}:
		table := l.CreateTable(len(v), 0)
		for _, item := range v {
			table.Append(toLua(l, item))
		}
		return table
	case map[string]interface{}:
		table := l.CreateTable(0, len(v))
		for key, item := range v {
			table.RawSetH(lua.LString(key), toLua(l, item))
		}
		return table
	}
	return lua.LNil
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "argo-health: "+format+"\n", args...)
	os.Exit(1)
}
