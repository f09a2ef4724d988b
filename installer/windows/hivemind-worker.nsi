; HiveMind Worker installer (NSIS 3, Modern UI 2).
;
; Per-user: installs into %LOCALAPPDATA%\Programs\HiveMind Worker without elevation and
; registers its uninstaller under HKCU, where Apps & Features finds it. Running a newer
; installer over an old one upgrades in place; settings and data live elsewhere
; (%LOCALAPPDATA%\HiveMind\hivemind-worker) and neither install nor uninstall touches them.
;
; makensis -DVERSION=1.2.3 -DEXE=dist\hivemind-worker.exe -DICON=file.ico
;          -DOUTFILE=dist\hivemind-worker-1.2.3-setup.exe installer\windows\hivemind-worker.nsi
; (`python3 build.py nsis` passes all four.)

Unicode true
ManifestDPIAware true
SetCompressor /SOLID lzma

!ifndef VERSION
  !error "pass the version: makensis -DVERSION=x.y.z"
!endif
!ifndef EXE
  !define EXE "..\..\dist\hivemind-worker.exe"
!endif
!ifndef ICON
  !define ICON "..\..\file.ico"
!endif
!ifndef OUTFILE
  !define OUTFILE "..\..\dist\hivemind-worker-${VERSION}-setup.exe"
!endif

!define APPNAME "HiveMind Worker"
!define EXENAME "hivemind-worker.exe"
!define PUBLISHER "HiveMind"
!define URL "https://github.com/hivemind/hivemind-worker"
!define UNINSTKEY "Software\Microsoft\Windows\CurrentVersion\Uninstall\HiveMindWorker"
!define RUNKEY "Software\Microsoft\Windows\CurrentVersion\Run"
; The value name the app's own "Start at login" setting uses (gui/autostart.py), so the
; installer's choice and the setting stay one switch.
!define RUNVALUE "HiveMind Worker"

Name "${APPNAME}"
OutFile "${OUTFILE}"
; No UAC prompt: everything goes under the person's own profile and HKCU.
RequestExecutionLevel user
InstallDir "$LOCALAPPDATA\Programs\${APPNAME}"
; An earlier install's folder wins, so an upgrade lands on top of it.
InstallDirRegKey HKCU "${UNINSTKEY}" "InstallLocation"
BrandingText "${APPNAME} ${VERSION}"

; Explorer's Details tab for the installer itself. VIProductVersion needs four numbers.
!searchreplace VERSION_DOTTED "${VERSION}" "-" "."
VIProductVersion "${VERSION_DOTTED}.0"
VIAddVersionKey "ProductName" "${APPNAME}"
VIAddVersionKey "CompanyName" "${PUBLISHER}"
VIAddVersionKey "FileDescription" "${APPNAME} installer"
VIAddVersionKey "FileVersion" "${VERSION}"
VIAddVersionKey "ProductVersion" "${VERSION}"
VIAddVersionKey "LegalCopyright" "MIT License"

!include "MUI2.nsh"
!include "LogicLib.nsh"
!include "FileFunc.nsh"

!define MUI_ICON "${ICON}"
!define MUI_UNICON "${ICON}"
!define MUI_ABORTWARNING
!define MUI_COMPONENTSPAGE_SMALLDESC
!define MUI_FINISHPAGE_RUN "$INSTDIR\${EXENAME}"
!define MUI_FINISHPAGE_RUN_TEXT "Start ${APPNAME} now"

!insertmacro MUI_PAGE_WELCOME
!insertmacro MUI_PAGE_COMPONENTS
!insertmacro MUI_PAGE_DIRECTORY
!insertmacro MUI_PAGE_INSTFILES
!insertmacro MUI_PAGE_FINISH

!insertmacro MUI_UNPAGE_CONFIRM
!insertmacro MUI_UNPAGE_INSTFILES

!insertmacro MUI_LANGUAGE "English"

; ---------------------------------------------------------------------------- install

Section "${APPNAME}" SecApp
  SectionIn RO
  SetOutPath "$INSTDIR"

  ; A running worker keeps its exe locked; ask the person to quit it rather than kill it
  ; mid-task (its tasks would only come back after their leases expire).
  retry:
  ClearErrors
  ${If} ${FileExists} "$INSTDIR\${EXENAME}"
    Delete "$INSTDIR\${EXENAME}"
    ${If} ${Errors}
      MessageBox MB_RETRYCANCEL|MB_ICONEXCLAMATION \
        "${APPNAME} is running. Quit it from its tray icon, then press Retry." \
        /SD IDCANCEL IDRETRY retry
      Abort "${APPNAME} is still running."
    ${EndIf}
  ${EndIf}

  File "/oname=${EXENAME}" "${EXE}"
  WriteUninstaller "$INSTDIR\uninstall.exe"

  ; Apps & Features (HKCU: this person's apps).
  WriteRegStr HKCU "${UNINSTKEY}" "DisplayName" "${APPNAME}"
  WriteRegStr HKCU "${UNINSTKEY}" "DisplayVersion" "${VERSION}"
  WriteRegStr HKCU "${UNINSTKEY}" "Publisher" "${PUBLISHER}"
  WriteRegStr HKCU "${UNINSTKEY}" "DisplayIcon" "$INSTDIR\${EXENAME},0"
  WriteRegStr HKCU "${UNINSTKEY}" "InstallLocation" "$INSTDIR"
  WriteRegStr HKCU "${UNINSTKEY}" "URLInfoAbout" "${URL}"
  WriteRegStr HKCU "${UNINSTKEY}" "UninstallString" '"$INSTDIR\uninstall.exe"'
  WriteRegStr HKCU "${UNINSTKEY}" "QuietUninstallString" '"$INSTDIR\uninstall.exe" /S'
  WriteRegDWORD HKCU "${UNINSTKEY}" "NoModify" 1
  WriteRegDWORD HKCU "${UNINSTKEY}" "NoRepair" 1
  ${GetSize} "$INSTDIR" "/S=0K" $0 $1 $2
  IntFmt $0 "0x%08X" $0
  WriteRegDWORD HKCU "${UNINSTKEY}" "EstimatedSize" "$0"
SectionEnd

Section "Start menu shortcut" SecStartMenu
  SectionIn RO
  CreateShortCut "$SMPROGRAMS\${APPNAME}.lnk" "$INSTDIR\${EXENAME}" "" "$INSTDIR\${EXENAME}" 0
SectionEnd

Section /o "Desktop shortcut" SecDesktop
  CreateShortCut "$DESKTOP\${APPNAME}.lnk" "$INSTDIR\${EXENAME}" "" "$INSTDIR\${EXENAME}" 0
SectionEnd

Section /o "Start ${APPNAME} when I log in" SecAutostart
  WriteRegStr HKCU "${RUNKEY}" "${RUNVALUE}" '"$INSTDIR\${EXENAME}" gui --hidden'
SectionEnd

!insertmacro MUI_FUNCTION_DESCRIPTION_BEGIN
  !insertmacro MUI_DESCRIPTION_TEXT ${SecApp} "The worker: the tray app and every command."
  !insertmacro MUI_DESCRIPTION_TEXT ${SecStartMenu} "A shortcut in the Start menu."
  !insertmacro MUI_DESCRIPTION_TEXT ${SecDesktop} "A shortcut on the desktop."
  !insertmacro MUI_DESCRIPTION_TEXT ${SecAutostart} \
    "Start in the tray when you log in. You can change this later in Settings."
!insertmacro MUI_FUNCTION_DESCRIPTION_END

Function .onInit
  ; On an upgrade, keep the start-at-login choice the person made (in the installer or
  ; in the app's settings) as the default.
  ClearErrors
  ReadRegStr $0 HKCU "${RUNKEY}" "${RUNVALUE}"
  ${IfNot} ${Errors}
    SectionSetFlags ${SecAutostart} ${SF_SELECTED}
  ${EndIf}
  ${If} ${FileExists} "$DESKTOP\${APPNAME}.lnk"
    SectionSetFlags ${SecDesktop} ${SF_SELECTED}
  ${EndIf}
FunctionEnd

; ---------------------------------------------------------------------------- uninstall

Section "Uninstall"
  retry:
  ClearErrors
  Delete "$INSTDIR\${EXENAME}"
  ${If} ${Errors}
    MessageBox MB_RETRYCANCEL|MB_ICONEXCLAMATION \
      "${APPNAME} is running. Quit it from its tray icon, then press Retry." \
      /SD IDCANCEL IDRETRY retry
    Abort "${APPNAME} is still running."
  ${EndIf}
  Delete "$INSTDIR\uninstall.exe"
  RMDir "$INSTDIR"
  Delete "$SMPROGRAMS\${APPNAME}.lnk"
  Delete "$DESKTOP\${APPNAME}.lnk"
  DeleteRegValue HKCU "${RUNKEY}" "${RUNVALUE}"
  DeleteRegKey HKCU "${UNINSTKEY}"
  ; Settings, the login token (Credential Manager) and data in %LOCALAPPDATA%\HiveMind
  ; stay: reinstalling picks up where the person left off.
SectionEnd
