//! Test certificates (rcgen): a private CA and a relay certificate for 127.0.0.1 it signs.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).expect("self-signed CA"),
        }
    }

    /// Writes the CA certificate as PEM; returns its path.
    pub fn write_ca(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.issuer.pem()).expect("write CA");
        path.to_path_buf()
    }

    /// Issues a server certificate for `localhost` and 127.0.0.1; writes `relay.crt` and
    /// `relay.key` into `dir` and returns their paths.
    pub fn issue_server(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("server params");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &*self.issuer).expect("sign server certificate");
        let (crt, pem_key) = (dir.join("relay.crt"), dir.join("relay.key"));
        std::fs::write(&crt, cert.pem()).expect("write certificate");
        std::fs::write(&pem_key, key.serialize_pem()).expect("write key");
        (crt, pem_key)
    }
}
