// Command etcd is etcd's own server entry point (what the etcd repository's root
// main.go does), built inside this wrapper module so that it shares the grpc/etcd
// client packages kube-apiserver compiles anyway.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
