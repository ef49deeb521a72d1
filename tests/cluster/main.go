// Command kube-cluster runs a real Kubernetes control plane on loopback for
// Tessera's tests: etcd (embedded), kube-apiserver and kube-controller-manager,
// built from Kubernetes' own Go modules. scripts/cluster starts and stops it.
//
//	kube-cluster apiserver --dir DIR           etcd + kube-apiserver; writes DIR/kubeconfig
//	kube-cluster controller-manager --dir DIR  kube-controller-manager against DIR's API server
//	kube-cluster rotate-sa-key --dir DIR       a new token signing key; the old one still verifies
//
// The first command generates everything a cluster's control plane is given
// by its installer (kubeadm does the same): a cluster CA, the API server's
// serving certificate, client certificates for cluster-admin and the
// controller manager, and the service-account signing key. The API server
// serves the service-account issuer's OIDC discovery and JWKS itself, as a
// real cluster does, with RBAC and Node authorization and the default
// admission plugins.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	dir := flags.String("dir", "", "directory holding this cluster's state, keys and kubeconfig")
	_ = flags.Parse(os.Args[2:])
	if *dir == "" {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "apiserver":
		err = runAPIServer(*dir)
	case "controller-manager":
		err = runControllerManager(*dir)
	case "rotate-sa-key":
		err = rotateServiceAccountKey(filepath.Join(*dir, "pki"))
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "kube-cluster %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: kube-cluster apiserver|controller-manager|rotate-sa-key --dir DIR")
	os.Exit(64)
}

// runAPIServer starts etcd in this process, then kube-apiserver in front of it.
func runAPIServer(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	pki := filepath.Join(dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return err
	}
	// A restart (the same DIR) keeps the port, the keys and etcd's data, as
	// a control-plane node's restart does.
	port, err := savedPort(dir, "apiserver")
	if err != nil {
		return err
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", port)
	if _, err := os.Stat(filepath.Join(pki, "ca.crt")); errors.Is(err, os.ErrNotExist) {
		if err := writePKI(pki, dir, server); err != nil {
			return err
		}
	}
	// Tokens are signed with sa.key; sa-retired-*.key still verify (a key
	// rotation, as kubeadm documents it).
	verify := []string{"--service-account-key-file=" + filepath.Join(pki, "sa.key")}
	retired, err := filepath.Glob(filepath.Join(pki, "sa-retired-*.key"))
	if err != nil {
		return err
	}
	for _, key := range retired {
		verify = append(verify, "--service-account-key-file="+key)
	}
	etcdURL, err := startEtcd(dir)
	if err != nil {
		return err
	}
	cmd := apiserver.NewAPIServerCommand()
	cmd.SetArgs(append(verify,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		// The endpoint reconciler refuses a loopback address; no pod needs the
		// kubernetes Service here.
		"--endpoint-reconciler-type=none",
		"--secure-port="+strconv.Itoa(port),
		"--etcd-servers="+etcdURL,
		"--cert-dir="+filepath.Join(dir, "apiserver-certs"),
		"--tls-cert-file="+filepath.Join(pki, "apiserver.crt"),
		"--tls-private-key-file="+filepath.Join(pki, "apiserver.key"),
		"--client-ca-file="+filepath.Join(pki, "ca.crt"),
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer="+server,
		"--service-account-signing-key-file="+filepath.Join(pki, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--v=0",
	))
	return cmd.Execute()
}

// savedPort returns the port saved as DIR/NAME.port, choosing and saving a
// free one on the first start.
func savedPort(dir, name string) (int, error) {
	path := filepath.Join(dir, name+".port")
	if text, err := os.ReadFile(path); err == nil {
		return strconv.Atoi(string(text))
	}
	port, err := freePort()
	if err != nil {
		return 0, err
	}
	return port, os.WriteFile(path, []byte(strconv.Itoa(port)), 0o600)
}

// runControllerManager runs kube-controller-manager with its own identity
// (system:kube-controller-manager) and a credential per controller.
func runControllerManager(dir string) error {
	pki := filepath.Join(dir, "pki")
	cmd := controllermanager.NewControllerManagerCommand()
	cmd.SetArgs([]string{
		"--kubeconfig=" + filepath.Join(dir, "controller-manager.kubeconfig"),
		"--authentication-kubeconfig=" + filepath.Join(dir, "controller-manager.kubeconfig"),
		"--authorization-kubeconfig=" + filepath.Join(dir, "controller-manager.kubeconfig"),
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--leader-elect=false",
		"--use-service-account-credentials=true",
		"--service-account-private-key-file=" + filepath.Join(pki, "sa.key"),
		"--root-ca-file=" + filepath.Join(pki, "ca.crt"),
		"--cluster-signing-cert-file=" + filepath.Join(pki, "ca.crt"),
		"--cluster-signing-key-file=" + filepath.Join(pki, "ca.key"),
		"--controllers=*,-nodeipam,-nodelifecycle,-persistentvolume-attach-detach-controller",
		"--v=0",
	})
	return cmd.Execute()
}

// startEtcd runs a single-member etcd with its data in DIR/etcd and returns
// its client URL once it serves.
func startEtcd(dir string) (string, error) {
	clientPort, err := savedPort(dir, "etcd-client")
	if err != nil {
		return "", err
	}
	peerPort, err := savedPort(dir, "etcd-peer")
	if err != nil {
		return "", err
	}
	client := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", clientPort)}
	peer := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", peerPort)}
	cfg := embed.NewConfig()
	cfg.Dir = filepath.Join(dir, "etcd")
	cfg.ListenClientUrls = []url.URL{client}
	cfg.AdvertiseClientUrls = []url.URL{client}
	cfg.ListenPeerUrls = []url.URL{peer}
	cfg.AdvertisePeerUrls = []url.URL{peer}
	cfg.InitialCluster = cfg.Name + "=" + peer.String()
	cfg.LogLevel = "error"
	etcd, err := embed.StartEtcd(cfg)
	if err != nil {
		return "", fmt.Errorf("etcd: %w", err)
	}
	select {
	case <-etcd.Server.ReadyNotify():
		return client.String(), nil
	case err := <-etcd.Err():
		return "", fmt.Errorf("etcd: %w", err)
	case <-time.After(60 * time.Second):
		etcd.Close()
		return "", errors.New("etcd did not become ready within 60 s")
	}
}

// freePort asks the kernel for a free loopback port.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// writePKI generates the cluster CA, serving and client certificates and the
// service-account key, and writes the two kubeconfigs.
func writePKI(pki, dir, server string) error {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	caTemplate := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kubernetes"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(pki, "ca.crt"), "CERTIFICATE", caDER); err != nil {
		return err
	}
	if err := writeKey(filepath.Join(pki, "ca.key"), caKey); err != nil {
		return err
	}
	serving := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if err := issue(pki, "apiserver", serving, ca, caKey); err != nil {
		return err
	}
	clients := map[string]pkix.Name{
		"admin":              {CommonName: "kubernetes-admin", Organization: []string{"system:masters"}},
		"controller-manager": {CommonName: "system:kube-controller-manager"},
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	for name, subject := range clients {
		template := &x509.Certificate{Subject: subject, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		if err := issue(pki, name, template, ca, caKey); err != nil {
			return err
		}
		kubeconfig := name + ".kubeconfig"
		if name == "admin" {
			kubeconfig = "kubeconfig"
		}
		if err := writeKubeconfig(filepath.Join(dir, kubeconfig), server, caPEM, pki, name); err != nil {
			return err
		}
	}
	return writeServiceAccountKey(pki)
}

// rotateServiceAccountKey keeps the signing key as sa-retired-N.key (still
// verifying) and makes a new one; the API server uses it after a restart.
func rotateServiceAccountKey(pki string) error {
	retired, err := filepath.Glob(filepath.Join(pki, "sa-retired-*.key"))
	if err != nil {
		return err
	}
	next := filepath.Join(pki, fmt.Sprintf("sa-retired-%d.key", len(retired)+1))
	if err := os.Rename(filepath.Join(pki, "sa.key"), next); err != nil {
		return err
	}
	return writeServiceAccountKey(pki)
}

// writeServiceAccountKey makes the token signing key sa.key and its public
// half sa.pub.
func writeServiceAccountKey(pki string) error {
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(pki, "sa.key"), "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(saKey)); err != nil {
		return err
	}
	// The public half as kubeadm leaves it on control-plane nodes (what
	// Vault's jwt_validation_pubkeys takes).
	public, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return err
	}
	return writePEM(filepath.Join(pki, "sa.pub"), "PUBLIC KEY", public)
}

var serial int64 = 1

// issue signs template with the CA and writes NAME.crt and NAME.key.
func issue(pki, name string, template, ca *x509.Certificate, caKey *ecdsa.PrivateKey) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial++
	template.SerialNumber = big.NewInt(serial)
	template.NotBefore = time.Now().Add(-time.Hour)
	template.NotAfter = time.Now().Add(365 * 24 * time.Hour)
	template.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, template, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(pki, name+".crt"), "CERTIFICATE", der); err != nil {
		return err
	}
	return writeKey(filepath.Join(pki, name+".key"), key)
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "EC PRIVATE KEY", der)
}

func writePEM(path, kind string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600)
}

// writeKubeconfig writes a kubeconfig with the client certificate embedded,
// so it works from any directory and can be copied.
func writeKubeconfig(path, server string, caPEM []byte, pki, name string) error {
	cert, err := os.ReadFile(filepath.Join(pki, name+".crt"))
	if err != nil {
		return err
	}
	key, err := os.ReadFile(filepath.Join(pki, name+".key"))
	if err != nil {
		return err
	}
	b64 := base64.StdEncoding.EncodeToString
	config := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: tessera-test
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: tessera-test
  context:
    cluster: tessera-test
    user: %s
current-context: tessera-test
`, server, b64(caPEM), name, b64(cert), b64(key), name)
	return os.WriteFile(path, []byte(config), 0o600)
}
